//! What the daemons' release builds are made of: the crates split by what they are, so flowd needs no
//! part of tapd, and no test code reaches either binary.

use std::process::Command;

/// `package features` of every crate in `package`'s normal (release) dependency tree, itself first.
fn release_tree(package: &str) -> Vec<String> {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "-p", package, "-e", "normal", "--prefix", "none"])
        .args(["-f", "{p} [{f}]", "--locked", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn flowd_needs_no_part_of_tapd_and_neither_ships_test_code() {
    for (package, foreign) in [
        ("flowd", &["tapd ", "dnsflow-testkit ", "tempfile "][..]),
        ("tapd", &["flowd ", "dnsflow-testkit ", "tempfile "][..]),
    ] {
        let tree = release_tree(package);
        assert!(
            tree[0].starts_with(&format!("{package} v")) && tree[0].ends_with(" []"),
            "{package} is built with no features (no test-support): {}",
            tree[0]
        );
        for line in &tree {
            for f in foreign {
                assert!(!line.starts_with(f), "{package} depends on {line}");
            }
        }
        assert!(
            tree.iter().any(|l| l.starts_with("dnsflow-dnstap ")),
            "{package} decodes with the dnstap crate"
        );
    }
}
