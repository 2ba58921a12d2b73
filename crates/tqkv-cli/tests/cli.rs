//! The `tqkv` binary as a user runs it.
use std::process::Command;

fn tqkv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tqkv"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn distortion_json_has_the_documented_schema_and_matches_theory() {
    let out = tqkv(&[
        "distortion",
        "--dim",
        "128",
        "--bits",
        "1,2,3,4",
        "--mode",
        "mse,prod",
        "--rotation",
        "hadamard",
        "--samples",
        "20000",
        "--seed",
        "3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(v["dim"], 128);
    assert_eq!(v["rotation"], "hadamard");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    for (i, r) in rows.iter().enumerate() {
        let bits = r["bits"].as_f64().unwrap();
        assert_eq!(bits, (i % 4 + 1) as f64);
        assert_eq!(r["mode"], if i < 4 { "mse" } else { "prod" });
        for k in ["mse", "mse_theory", "ip_scale", "ip_bias", "ip_var"] {
            assert!(r[k].as_f64().unwrap().is_finite(), "{k} in {r}");
        }
        let ratio = r["mse"].as_f64().unwrap() / r["mse_theory"].as_f64().unwrap();
        assert!((ratio - 1.0).abs() < 0.03, "{r}");
    }
}

#[test]
fn distortion_table_and_bad_arguments() {
    let out = tqkv(&[
        "distortion",
        "--dim",
        "64",
        "--bits",
        "2.5",
        "--samples",
        "1000",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("mse_theory") && text.contains("2.5"),
        "{text}"
    );
    for (args, needle) in [
        (vec!["--bits", "9"], "1..=8"),
        (vec!["--dim", "8"], "16..=65536"),
        (vec!["--rotation", "givens"], "dense, hadamard"),
        (vec!["--mode", "fast"], "mse, prod"),
        (vec!["--dim", "100", "--rotation", "hadamard"], "Hadamard"),
        (vec!["--samples", "1"], "at least 2"),
    ] {
        let mut a = vec!["distortion"];
        a.extend(args.iter());
        if !a.contains(&"--samples") {
            a.extend(["--samples", "100"]);
        }
        let out = tqkv(&a);
        assert!(!out.status.success(), "{a:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{a:?}: {err}");
    }
}

#[test]
fn chat_says_the_runner_has_not_landed() {
    let out = tqkv(&["chat"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("issue 4"));
}
