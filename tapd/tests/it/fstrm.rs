//! libfstrm's own tools against tapd: `fstrm_replay` feeds a capture in; tapd's `--capture` output is
//! read back by `fstrm_dump` and by [`dnsflow_dnstap::CaptureReader`].

use crate::common::{client_response, collect, other_message, subscribe, tapd, Sender};
use dnsflow_dnstap::{CaptureReader, CaptureWriter};
use dnsflow_proto::dnstap::message::Type;
use dnsflow_testkit::require_tool;
use std::{fs::File, io::BufWriter, net::IpAddr, process::Command, time::Duration};

#[tokio::test(flavor = "multi_thread")]
async fn fstrm_replay_feeds_a_capture_into_tapd() {
    require_tool("fstrm_replay").unwrap();
    let tapd = tapd(&[]);
    let mut sub = subscribe(&tapd.addrs, &["10.244.0.0/16"], false).await;

    let file = tapd.dir.path().join("in.fstrm");
    let mut w = CaptureWriter::new(BufWriter::new(File::create(&file).unwrap())).unwrap();
    for i in 1..=3u8 {
        let client = IpAddr::from([10, 244, 1, i]);
        w.write_frame(&client_response(
            client,
            &format!("n{i}.example.com."),
            [192, 0, 2, i].into(),
        ))
        .unwrap();
    }
    w.write_frame(&other_message(Type::ForwarderResponse, &[10, 96, 0, 10]))
        .unwrap();
    w.finish().unwrap();

    let out = Command::new("fstrm_replay")
        .args(["-t", dnsflow_proto::DNSTAP_CONTENT_TYPE, "-r"])
        .arg(&file)
        .arg("-u")
        .arg(&tapd.addrs.socket)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let events = collect(&mut sub, 3).await;
    let names: Vec<&str> = events.iter().map(|e| e.query_name.as_str()).collect();
    assert_eq!(
        names,
        ["n1.example.com", "n2.example.com", "n3.example.com"]
    );
    assert_eq!(events[2].client_ip, "10.244.1.3");
    assert_eq!(events[2].answers[0].ip, "192.0.2.3");
    assert_eq!(tapd.addrs.metric("tapd_ignored_messages_total"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn capture_flag_writes_a_file_fstrm_dump_and_capture_reader_read() {
    require_tool("fstrm_dump").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cap.fstrm");
    let mut tapd = tapd(&["--capture", path.to_str().unwrap()]);
    let mut s = Sender::connect(&tapd.addrs.socket, true).await;
    s.answer([10, 0, 0, 1], "a.example.", [192, 0, 2, 1]).await;
    s.send(&other_message(Type::ClientQuery, &[10, 0, 0, 1]))
        .await;
    s.answer([10, 0, 0, 2], "b.example.", [192, 0, 2, 2]).await;
    s.stop(true).await;
    dnsflow_testkit::wait_until("frames counted", || {
        tapd.addrs.metric("tapd_frames_total") == 3
    })
    .unwrap();
    // SIGTERM drains: the capture gets its STOP and the socket goes.
    let status = tapd.daemon.terminate(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!tapd.addrs.socket.exists());

    let dump = Command::new("fstrm_dump").arg(&path).output().unwrap();
    // fstrm_dump prints the payloads on stdout and the framing on stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&dump.stdout),
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(dump.status.success(), "{dump:?}");
    assert!(text.contains("FSTRM_CONTROL_START"), "{text}");
    assert!(text.contains("protobuf:dnstap.Dnstap"), "{text}");
    assert_eq!(text.matches("Data frame").count(), 3, "{text}");
    assert!(text.contains("FSTRM_CONTROL_STOP"), "{text}");

    let mut reader = CaptureReader::new(File::open(&path).unwrap());
    let names: Vec<String> = reader
        .by_ref()
        .map(|r| r.unwrap().qname.to_string())
        .collect();
    assert_eq!(names, ["a.example", "b.example"]);
    assert_eq!(reader.stats().skipped, 1);
}
