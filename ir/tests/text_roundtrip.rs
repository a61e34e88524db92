//! Printer → parser → printer is the identity, on random graphs and on every op.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use tilefuse_ir::testing::{arb_step, build};
use tilefuse_ir::{shape, Builder, DType, Graph, Mask, RouterConfig, ScoreFn};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn print_parse_print_is_identity(steps in proptest::collection::vec(arb_step(), 0..40)) {
        let g = build(&steps);
        let text = g.to_string();
        let back: Graph = text.parse().map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        back.verify().map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(back.to_string(), text.clone());
        // Deterministic: building the same steps again prints the same bytes.
        prop_assert_eq!(build(&steps).to_string(), text);
    }
}

#[test]
fn every_structured_op_round_trips() {
    let mut b = Builder::new("all_ops", &["S", "T"]);
    let ids = b.input("ids", DType::I32, shape![T]).unwrap();
    let pos = b.input("pos", DType::I32, shape![T]).unwrap();
    let seed = b.input("seed", DType::I32, shape![2]).unwrap();
    let emb = b.weight("emb", DType::BF16, shape![100, 32]).unwrap();
    let x = b.embedding(emb, ids).unwrap();
    let wq = b.weight("wq", DType::MXFP4, shape![64, 32]).unwrap();
    let q = b.matmul(x, wq).unwrap();
    let q = b.reshape(q, shape![T, 4, 16]).unwrap();
    let q = b.rope(q, pos, 1e4, 8).unwrap();
    let wk = b.weight("wk", DType::NVFP4, shape![32, 32]).unwrap();
    let k = b.matmul(x, wk).unwrap();
    let k = b.reshape(k, shape![T, 2, 16]).unwrap();
    let kc = b.cache("k_cache", DType::BF16, shape![23, 2, 16]).unwrap();
    let keys = b.kv_append(kc, k, "S", true).unwrap();
    let sinks = b.weight("sinks", DType::BF16, shape![4]).unwrap();
    let a = b
        .attention(
            q,
            keys,
            keys,
            Some(sinks),
            Mask::Causal { window: Some(8) },
            0.25,
        )
        .unwrap();
    let a2 = b
        .attention(q, keys, keys, None, Mask::Block { window: None }, 0.25)
        .unwrap();
    let a = b.add(a, a2).unwrap();
    let h = b.reshape(a, shape![T, 64]).unwrap();
    let wr = b.weight("router", DType::BF16, shape![8, 64]).unwrap();
    let logits = b.matmul_to(h, wr, DType::F32).unwrap();
    let bias = b.weight("bias", DType::F32, shape![8]).unwrap();
    let cfg = RouterConfig {
        score: ScoreFn::Sigmoid,
        top_k: 2,
        n_group: 4,
        topk_group: 2,
        norm_topk: true,
        norm_eps: 1e-20,
        scale: 2.5,
    };
    let idx = b.router_select(logits, Some(bias), &cfg).unwrap();
    let w = b.router_weights(logits, idx, &cfg).unwrap();
    let w13 = b.weight("w13", DType::MXFP4, shape![8, 64, 64]).unwrap();
    let w2 = b.weight("w2", DType::MXFP4, shape![8, 64, 32]).unwrap();
    let y = b.experts(h, idx, w, w13, w2).unwrap();
    let t = b.argmax(y).unwrap();
    let s = b.sample(logits, seed, 0.7).unwrap();
    b.output("tok", t).unwrap();
    b.output("sampled", s).unwrap();
    let g = b.finish().unwrap();
    let text = g.to_string();
    assert!(
        text.contains("attn.attention{mask=causal, window=8, scale=0.25, sinks=true}"),
        "{text}"
    );
    assert!(
        text.contains("moe.router_weights{score=sigmoid, norm=true, norm_eps=1e-20, scale=2.5}"),
        "{text}"
    );
    assert!(text.contains("attn.kv_append{len=S, ring=true}"), "{text}");
    assert!(text.contains(": bf16[S+T,2,16]"), "{text}");
    let back: Graph = text.parse().unwrap();
    assert_eq!(back.to_string(), text);
}
