#!/usr/bin/env python3
"""Merges the rows of a newer `tqkv eval kld --json` run into an older one of the same text,
context and windows (scripts/quality-evals.sh presets), and rewrites the older run's Markdown
table beside it.

    python3 scripts/merge-eval.py docs/eval/gpl3-512.json new.json [--rename-old " (f16 window)"]

A row of the new run replaces the old row of the same kind; with --rename-old the old row is kept
under its kind + the suffix (the new row goes right after it).
"""
import json, os, sys


def table(d):
    rows = d["rows"]
    out = [
        f"reference {d['reference']}; {rows[0]['tokens'] if rows else 0} scored tokens of {d['text']}; "
        f"sizes all-in at {rows[0]['context'] if rows else 0} tokens (tables included)",
        "",
        f"| kv | mean KLD | max KLD | PPL | PPL ({d['reference']}) | Δ PPL | top-1 same | bits/channel | bytes/token | KV bytes vs f16 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['kind']} | {r['mean_kld']:.5f} | {r['max_kld']:.3f} | {r['ppl']:.3f} | {r['ppl_ref']:.3f} | "
            f"{100 * (r['ppl'] / r['ppl_ref'] - 1):+.2f}% | {100 * r['top1']:.1f}% | {r['bits_per_channel']:.3f} | "
            f"{r['bytes_per_token']:.0f} | {r['f16_bytes'] / max(r['kv_bytes'], 1):.2f}× smaller |"
        )
    return "\n".join(out) + "\n"


def main():
    args = sys.argv[1:]
    suffix = None
    if "--rename-old" in args:
        i = args.index("--rename-old")
        suffix = args[i + 1]
        del args[i : i + 2]
    old_path, new_path = args
    old, new = json.load(open(old_path)), json.load(open(new_path))
    if os.path.realpath(old.get("text", "")) != os.path.realpath(new.get("text", "")):
        sys.exit(f"{new_path}: text {new.get('text')!r} is not {old_path}'s {old.get('text')!r}")
    for key in ("ctx", "windows", "skip", "chunk", "reference"):
        if old.get(key) != new.get(key):
            sys.exit(f"{new_path}: {key} {new.get(key)!r} differs from {old_path}'s {old.get(key)!r}")
    rows = old["rows"]
    for r in new["rows"]:
        at = next((i for i, o in enumerate(rows) if o["kind"] == r["kind"]), None)
        if at is None:
            rows.append(r)
        elif suffix and not any(o["kind"] == r["kind"] + suffix for o in rows):
            rows[at]["kind"] += suffix
            rows.insert(at + 1, r)
        else:
            rows[at] = r
    json.dump(old, open(old_path, "w"), indent=2)
    open(old_path[: -len(".json")] + ".md", "w").write(table(old))


main()
