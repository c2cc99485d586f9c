//! Values on the command line and in the environment that clap does not parse itself.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

/// Parses a listen address: `IP:port`, `[IPv6]:port`, or an IPv6 address followed by `:port` without
/// brackets, which is what a manifest gets from `$(NODE_IP):9541` on an IPv6 node.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    s.rsplit_once(':')
        .and_then(|(ip, port)| {
            Some(SocketAddr::new(
                ip.parse::<IpAddr>().ok()?,
                port.parse().ok()?,
            ))
        })
        .ok_or_else(|| format!("{s:?} is not an address like 10.0.0.1:9541 or [fd00::1]:9541"))
}

/// Parses `500ms`, `30s`, `15m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_with_and_without_brackets() {
        assert_eq!(
            parse_listen("10.0.0.1:9541"),
            Ok("10.0.0.1:9541".parse().unwrap())
        );
        assert_eq!(
            parse_listen("[fd00::1]:9541"),
            Ok("[fd00::1]:9541".parse().unwrap())
        );
        assert_eq!(
            parse_listen("fd00::1:9541"),
            Ok("[fd00::1]:9541".parse().unwrap())
        );
        for bad in [
            "",
            "10.0.0.1",
            "10.0.0.1:",
            "host:9541",
            "10.0.0.1:70000",
            ":9541",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn units_and_bare_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
