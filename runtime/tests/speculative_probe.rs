#![allow(clippy::unwrap_used, missing_docs)]
use std::time::Instant;
use tilefuse_model::{dflash, presets};
use tilefuse_runtime::speculative::{DFlashDrafter, SpecDecoder, SpecOptions, SamplingRule};
use tilefuse_runtime::{Backend, Executable, Sampling, Session};

#[test]
fn probe() {
    for (t, d) in [("mimo-v2-tiny", "mimo-v2-tiny-dflash"), ("qwen3-moe-tiny", "qwen3-moe-tiny-dflash")] {
        let p = presets::by_name(t).unwrap();
        let dp = dflash::draft_preset(d).unwrap();
        let tg = dflash::target_graph(&p.arch, &p.options, &dp.config.target_layer_ids).unwrap();
        let tw = presets::random_weights(&tg, 7).unwrap();
        let dg = dflash::draft_graph(&dp.config, &p.options).unwrap();
        let dw = dflash::random_draft_weights(&dg, &tw, 7).unwrap();
        let fg = p.arch.forward_graph(&p.options).unwrap();
        let mut s = Session::new(Executable::new(fg, tw.clone(), Backend::Cpu).unwrap(), 512, 16).unwrap();
        let t0 = Instant::now();
        let plain = s.generate(&[1, 2, 3, 4, 5], 40, Sampling::Greedy, |_| true).unwrap();
        println!("{t}: plain 40 tokens {:?}", t0.elapsed());
        let drafter = DFlashDrafter::new(Executable::new(dg, dw, Backend::Cpu).unwrap(), dp.config.mask_id(), 16).unwrap();
        let mut e = SpecDecoder::new(Executable::new(tg, tw, Backend::Cpu).unwrap(), drafter, SpecOptions { block: 8, context: 512, max_tokens: 16, rule: SamplingRule::Rejection, trace_logits: false }).unwrap();
        let t0 = Instant::now();
        let spec = e.generate(&[1, 2, 3, 4, 5], 40, Sampling::Greedy, |_| true).unwrap();
        println!("{t}: spec 40 tokens {:?} tau {} draft {:?} verify {:?}", t0.elapsed(), e.stats.tau(), e.stats.draft_per_step(), e.stats.verify_per_step());
        assert_eq!(plain, spec);
    }
}
