//! Putting the quantized KV cache into your own candle model.
//!
//! A toy decoder layer (q/k/v/o projections, RoPE, GQA 6:2, head_dim 64) whose attention is
//! `tqkv_candle::Attention`: swap the cache with one string. Runs a 48-token prefill and 16
//! decode steps with each kind and prints the memory and the distance to the f32 cache.
//!
//! `cargo run --release -p tqkv-candle --example own_model`

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder, VarMap};
use tqkv_candle::{Attention, CacheConfig};

const HIDDEN: usize = 384;
const HEADS: usize = 6;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn: Attention, // <- the only tqkv line in the model
}

impl Layer {
    fn new(vb: VarBuilder, cache: &CacheConfig, index: usize) -> Result<Self> {
        Ok(Layer {
            q: linear_no_bias(HIDDEN, HEADS * HEAD_DIM, vb.pp("q"))?,
            k: linear_no_bias(HIDDEN, KV_HEADS * HEAD_DIM, vb.pp("k"))?,
            v: linear_no_bias(HIDDEN, KV_HEADS * HEAD_DIM, vb.pp("v"))?,
            o: linear_no_bias(HEADS * HEAD_DIM, HIDDEN, vb.pp("o"))?,
            attn: Attention::new(
                cache.build(index, KV_HEADS, HEAD_DIM, vb.device())?,
                HEADS,
                KV_HEADS,
                HEAD_DIM,
            )?,
        })
    }

    /// x: [batch, tokens, hidden] at positions pos..pos+tokens.
    fn forward(&mut self, x: &Tensor, pos: usize) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, h: usize| {
            y.reshape((b, t, h, HEAD_DIM))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (cos, sin) = rope_tables(pos, t, x.device())?;
        let q = candle_nn::rotary_emb::rope(&split(self.q.forward(x)?, HEADS)?, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope(&split(self.k.forward(x)?, KV_HEADS)?, &cos, &sin)?;
        let v = split(self.v.forward(x)?, KV_HEADS)?;
        let y = self.attn.forward(&q, &k, &v)?; // append to the cache, attend
        self.o
            .forward(&y.transpose(1, 2)?.reshape((b, t, HEADS * HEAD_DIM))?)
    }
}

fn rope_tables(pos: usize, t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..HEAD_DIM / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / HEAD_DIM as f32))
        .collect();
    let ang: Vec<f32> = (pos..pos + t)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    let ang = Tensor::from_vec(ang, (t, HEAD_DIM / 2), dev)?;
    Ok((ang.cos()?, ang.sin()?))
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let prompt = Tensor::randn(0f32, 1.0, (1, 48, HIDDEN), &dev)?;
    let steps: Vec<Tensor> = (0..16)
        .map(|_| Tensor::randn(0f32, 1.0, (1, 1, HIDDEN), &dev))
        .collect::<Result<_>>()?;
    let mut reference: Option<Vec<Tensor>> = None;
    println!(
        "{:>8} {:>12} {:>10} {:>16}",
        "cache", "KV bytes", "vs f32", "rel. error vs f32"
    );
    for kind in ["f32", "f16", "q8", "q4h", "kivi4", "tq3.5", "tq2.5"] {
        // One config value picks the cache. In a deeper model,
        // `.with_outer_layers(2, 2, n_layers, "f16".parse()?)` keeps the first and last two
        // layers in f16.
        let cfg = CacheConfig::new(kind.parse()?);
        let mut layer = Layer::new(vb.clone(), &cfg, 0)?;
        let mut outs = vec![layer.forward(&prompt, 0)?];
        for (i, x) in steps.iter().enumerate() {
            outs.push(layer.forward(x, 48 + i)?);
        }
        let mem = layer.attn.memory().logical;
        let f32_bytes = 64 * 2 * KV_HEADS * HEAD_DIM * 4;
        let err = match &reference {
            None => 0.0,
            Some(r) => {
                let (mut num, mut den) = (0.0f32, 0.0f32);
                for (a, b) in outs.iter().zip(r) {
                    num += (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
                    den += b.sqr()?.sum_all()?.to_scalar::<f32>()?;
                }
                (num / den).sqrt()
            }
        };
        println!(
            "{kind:>8} {mem:>12} {:>9.2}× {err:>16.4}",
            f32_bytes as f64 / mem as f64
        );
        if reference.is_none() {
            reference = Some(outs);
        }
    }
    Ok(())
}
