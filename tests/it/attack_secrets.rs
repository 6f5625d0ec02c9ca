//! Secrets stay secret: a password in an upstream endpoint is refused by `check-config` (and
//! `resolve`) without being echoed; `resolve`'s credential id is a keyed hash that differs in
//! every process, so it cannot be used to test password guesses offline. (That `DENIED` bodies
//! name no Secret or catalog object is asserted end to end in `modules.rs`, scenario 3.)

use crate::support;

use std::process::Command;

use support::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oci-proxy"))
}

#[test]
fn userinfo_in_an_endpoint_is_refused_without_echoing_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "listen: 127.0.0.1:5000\nupstreams:\n  - name: a.example\n    \
         endpoint: http://bob:hunter2-pw@127.0.0.1:5000\n",
    )
    .unwrap();
    for args in [
        vec!["check-config".to_string(), cfg.display().to_string()],
        vec![
            "resolve".to_string(),
            "--config".to_string(),
            cfg.display().to_string(),
            "a.example/team/app".to_string(),
        ],
    ] {
        let out = bin().args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} accepted userinfo");
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            all.contains("upstreams[0].endpoint") && all.contains("user:password@"),
            "{args:?}: {all}"
        );
        assert!(
            !all.contains("hunter2-pw"),
            "{args:?} echoed the password: {all}"
        );
    }
}

/// The `credential id:` line `resolve` prints.
fn resolve_id(cfg: &std::path::Path) -> String {
    let out = bin()
        .args(["resolve", "--config"])
        .arg(cfg)
        .arg("a.example/team/app")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("weak-password-1"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix("credential id: "))
        .unwrap_or_else(|| panic!("no credential id in {text}"))
        .to_string()
}

#[test]
fn resolve_credential_ids_differ_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let dc = dir.path().join("docker.json");
    write_docker_config(&dc, "a.example", "bob", "weak-password-1");
    let cfg = dir.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:5000\ncache:\n  dir: \"{}/cache\"\ncredentials:\n  docker_config: \"{}\"\n\
             upstreams:\n  - name: a.example\n    endpoint: http://127.0.0.1:1\n",
            dir.path().display(),
            dc.display()
        ),
    )
    .unwrap();
    let first = resolve_id(&cfg);
    let second = resolve_id(&cfg);
    assert_eq!(first.len(), 24, "{first}");
    assert_ne!(first, second, "the id must be keyed per process");
}
