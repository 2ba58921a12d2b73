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
fn chat_answers_with_the_default_model_and_a_35_bit_cache() {
    // No --model: the hub is tried, then the offline GGUF (fetched by scripts/fetch-model.sh).
    let out = Command::new(env!("CARGO_BIN_EXE_tqkv"))
        .args([
            "chat",
            "--prompt",
            "What is the capital of France? Answer with one word.",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
    assert!(
        err.contains("KV cache tq3.5") && err.contains("bits per channel"),
        "{err}"
    );
}

/// `tqkv chat <args>` offline with `input` typed on stdin.
fn chat_session(args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tqkv"))
        .arg("chat")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn interactive_chat_keeps_history_and_handles_commands() {
    let out = chat_session(
        &["--temperature", "0", "--max-tokens", "12", "--kv", "q8"],
        b"Who wrote Romeo and Juliet?\n/stats\nAnd Hamlet?\n/reset\n/stats\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("Shakespeare"));
    assert!(err.contains("conversation forgotten"), "{err}");
    // /stats after the first turn, after /reset (context 0), and the final report.
    let contexts: Vec<&str> = err.lines().filter(|l| l.contains("context")).collect();
    assert_eq!(contexts.len(), 3, "{err}");
    assert!(contexts[1].contains("context 0 tokens"), "{err}");
}

#[test]
fn chat_at_max_context_cuts_the_reply_and_keeps_the_conversation() {
    let out = chat_session(
        &[
            "--temperature",
            "0",
            "--max-tokens",
            "200",
            "--max-context",
            "64",
            "--kv",
            "tq3.5",
        ],
        b"Tell me a long story about a dragon.\nAnd then?\n/stats\n/reset\nHi\n/stats\n",
    );
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{err}");
    // The first reply runs into the limit and is cut, not lost.
    assert!(stdout.contains("context of 64 tokens is full"), "{stdout}");
    // The second turn does not fit: an error, and the conversation is still held.
    assert!(err.contains("the context is full"), "{err}");
    let contexts: Vec<&str> = err.lines().filter(|l| l.contains("; context ")).collect();
    assert!(contexts[0].contains("context 64 tokens"), "{err}");
    // /reset then starts over.
    assert!(!contexts[1].contains("context 64 tokens"), "{err}");
}

#[test]
fn bench_takes_tiny_and_bad_arguments_without_panicking() {
    let base = ["bench", "attention", "--device", "cpu", "--iters", "1"];
    // Contexts at and below the prefill chunk (the chunk timing is skipped for them).
    let small = [
        "--contexts",
        "1,3",
        "--batch",
        "1",
        "--kv",
        "f16,tq3.5",
        "--q-heads",
        "4",
        "--kv-heads",
        "2",
        "--head-dim",
        "64",
        "--prefill-chunk",
        "2",
    ];
    let out = tqkv(&[&base[..], &small[..]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for bad in [
        &["--contexts", "0"][..],
        &["--contexts", "4", "--batch", "0"],
        &["--contexts", "4", "--q-heads", "0"],
        &["--contexts", "4", "--head-dim", "0"],
        &["--contexts", "4", "--kv", "bogus"],
        &[
            "--contexts",
            "4",
            "--kv",
            "tq3.5",
            "--head-dim",
            "8",
            "--q-heads",
            "2",
            "--kv-heads",
            "2",
        ],
    ] {
        let out = tqkv(&[&base[..], bad].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {err}");
        assert!(!err.contains("panicked"), "{bad:?}: {err}");
    }
}

#[test]
fn bad_model_arguments_are_clear_errors() {
    for (args, needle) in [
        (vec!["--model", "/nonexistent/model.gguf"], "no such file"),
        (vec!["--kv", "int3"], "unknown KV cache kind"),
        (vec!["--device", "tpu"], "expected cpu, cuda"),
        (vec!["--kv", "f16", "--key-bits", "4"], "TurboQuant"),
        (vec!["--top-p", "0"], "top_p"),
    ] {
        let mut a = vec!["chat", "--prompt", "hi"];
        a.extend(args.iter());
        let out = Command::new(env!("CARGO_BIN_EXE_tqkv"))
            .args(&a)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{a:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{a:?}: {err}");
    }
}
