//! Compiles `kernels/*.cu` with nvcc when the `cuda` feature is on; touches nothing CUDA otherwise.
//!
//! Each `kernels/NAME.cu` (device code and its `extern "C"` launchers) becomes one object with
//! sm_80 and sm_90 cubins plus compute_80 PTX (JIT-able by newer GPUs), or only the sm_NN cubin
//! with `TQKV_CUDA_ARCH=NN` (the GPU bundle); the objects are archived
//! into `libtqkv_kernels.a` and linked with the static CUDA runtime; `src/cuda.rs` declares the
//! launchers. No fast-math: the kernels must reproduce the CPU reference's codes. nvcc is found
//! from `NVCC`, then `CUDA_ROOT` / `CUDA_HOME` / `CUDA_PATH` (`bin/nvcc`), then PATH; none of them
//! is a build error saying how to get one (scripts/install-nvcc.sh installs CUDA 13.0's nvcc from
//! PyPI; scripts/build-cuda.sh builds the whole workspace with `cuda` on a machine without a GPU).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return Ok(());
    }
    for var in ["NVCC", "CUDA_ROOT", "CUDA_HOME", "CUDA_PATH", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let nvcc = find_nvcc()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir("kernels")
        .context("reading kernels/")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for f in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cuh"))
    {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let sources: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    if sources.is_empty() {
        bail!("feature `cuda`: kernels/ has no .cu files");
    }
    // Targets: sm_80 and sm_90 cubins plus compute_80 PTX, or with TQKV_CUDA_ARCH=NN only the
    // sm_NN cubin (scripts/gpu-bundle.sh: smaller binaries for a known GPU).
    println!("cargo:rerun-if-env-changed=TQKV_CUDA_ARCH");
    let gencode: Vec<String> = match std::env::var("TQKV_CUDA_ARCH") {
        Ok(a) if !a.trim().is_empty() => {
            let a = a.trim();
            if !a.chars().all(|c| c.is_ascii_digit()) {
                bail!("TQKV_CUDA_ARCH must be a compute capability such as 90, not {a:?}");
            }
            vec![format!("-gencode=arch=compute_{a},code=sm_{a}")]
        }
        _ => vec![
            "-gencode=arch=compute_80,code=sm_80".into(),
            "-gencode=arch=compute_90,code=sm_90".into(),
            "-gencode=arch=compute_80,code=compute_80".into(),
        ],
    };
    let mut objects = Vec::new();
    for src in sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let obj = out.join(format!("{stem}.o"));
        let mut args = vec!["-c".to_string(), "-Xcompiler".into(), "-fPIC".into()];
        args.extend(gencode.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nvcc_run(&nvcc, src, &args, &obj)?;
        objects.push(obj);
    }
    let lib = out.join("libtqkv_kernels.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new("ar")
        .arg("rcs")
        .arg(&lib)
        .args(&objects)
        .status()
        .context("running ar")?;
    if !status.success() {
        bail!("ar failed building {}", lib.display());
    }
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=tqkv_kernels");
    // The CUDA runtime, statically (the PyPI nvcc ships lib/, a toolkit lib64/).
    let root = nvcc
        .parent()
        .and_then(|b| b.parent())
        .map(Path::to_path_buf)
        .unwrap_or_default();
    for dir in ["lib", "lib64"] {
        if root.join(dir).join("libcudart_static.a").exists() {
            println!(
                "cargo:rustc-link-search=native={}",
                root.join(dir).display()
            );
        }
    }
    println!("cargo:rustc-link-lib=static=cudart_static");
    for l in ["rt", "dl", "pthread", "stdc++"] {
        println!("cargo:rustc-link-lib=dylib={l}");
    }
    Ok(())
}

fn nvcc_run(nvcc: &Path, src: &Path, args: &[&str], dst: &Path) -> Result<()> {
    let status = Command::new(nvcc)
        .args(args)
        .args(["-O3", "-std=c++17", "-Ikernels", "-o"])
        .arg(dst)
        .arg(src)
        .status()
        .with_context(|| format!("running {}", nvcc.display()))?;
    if !status.success() {
        bail!("nvcc failed on {} ({args:?})", src.display());
    }
    Ok(())
}

fn find_nvcc() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Ok(PathBuf::from(p));
    }
    for var in ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var) {
            let p = PathBuf::from(root).join("bin").join("nvcc");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!(
        "feature `cuda` needs nvcc, and none was found (looked at $NVCC, $CUDA_ROOT/bin, \
         $CUDA_HOME/bin, $CUDA_PATH/bin and PATH). Install a CUDA toolkit, or CUDA 13.0's nvcc \
         from PyPI with scripts/install-nvcc.sh (../shared/docs/GPU.md), then export CUDA_ROOT."
    )
}
