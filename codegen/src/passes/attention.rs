//! Attention fusion: for every `attn.attention` over KV-cache appends, one
//! kernel computes attention, applying the query's per-head norm and RoPE as
//! it loads the queries. The new keys (after their per-head norm and RoPE)
//! and values are appended to the caches by that same kernel when they are
//! the queries' own tokens, else by a kernel of their own before it.

use tilefuse_ir::{Attn, Nn, NodeId, Op};

use crate::error::CodegenError;
use crate::fusion::{Fused, Group, KernelKind};

fn unsupported(f: &Fused, n: NodeId, reason: &str) -> CodegenError {
    CodegenError::Unsupported {
        node: f.graph.describe(n),
        reason: reason.to_string(),
    }
}

/// `n` through an optional per-head RMSNorm that only `user` reads.
fn optional_norm(f: &Fused, n: NodeId) -> Option<NodeId> {
    matches!(f.graph.node(n).op, Op::Nn(Nn::RmsNorm { .. }))
        .then_some(n)
        .filter(|&m| f.real_users(m).len() == 1 && !f.is_output(m))
}

/// Creates the RoPE-append and attention groups.
pub fn run(f: &mut Fused) -> Result<(), CodegenError> {
    let attns: Vec<NodeId> = f
        .graph
        .topo_order()?
        .into_iter()
        .filter(|&n| matches!(f.graph.node(n).op, Op::Attn(Attn::Attention { .. })))
        .collect();
    for a in attns {
        let ins = f.graph.inputs(a);
        let (q, keys, values) = (ins[0], ins[1], ins[2]);
        let is_append = |n: NodeId| matches!(f.graph.node(n).op, Op::Attn(Attn::KvAppend { .. }));
        if !is_append(keys) || !is_append(values) {
            return Err(unsupported(
                f,
                a,
                "attention whose keys and values are not KV-cache appends (e.g. a concat of context and block keys); the GPU path needs `attn.kv_append` outputs as k and v",
            ));
        }
        let (Op::Attn(Attn::KvAppend { len: lk, .. }), Op::Attn(Attn::KvAppend { len: lv, .. })) =
            (&f.graph.node(keys).op, &f.graph.node(values).op)
        else {
            unreachable!("checked above")
        };
        if lk != lv {
            return Err(unsupported(
                f,
                a,
                "key and value caches of different lengths",
            ));
        }
        for c in [keys, values] {
            if f.real_users(c) != vec![a] {
                return Err(unsupported(
                    f,
                    c,
                    "a KV-cache view read by more than one attention",
                ));
            }
        }
        let k_new = f.graph.inputs(keys)[1];
        let k_rope = k_new;
        if !matches!(f.graph.node(k_rope).op, Op::Nn(Nn::Rope { .. })) {
            return Err(unsupported(
                f,
                keys,
                "keys appended without RoPE; the append kernel applies RoPE to new keys",
            ));
        }
        if f.real_users(k_rope).len() != 1 || f.is_output(k_rope) {
            return Err(unsupported(
                f,
                k_rope,
                "rotated keys used outside the cache append",
            ));
        }
        if !matches!(f.graph.node(q).op, Op::Nn(Nn::Rope { .. })) {
            return Err(unsupported(
                f,
                a,
                "queries without RoPE; the attention kernel applies RoPE as it loads them",
            ));
        }
        if f.real_users(q).len() != 1 || f.is_output(q) {
            return Err(unsupported(
                f,
                q,
                "rotated queries used outside the attention",
            ));
        }
        // Queries and keys may carry different position inputs (a draft's
        // keys span its context rows and its block): each kernel reads its own.
        let k_norm = optional_norm(f, f.graph.inputs(k_rope)[0]);
        let q_norm = optional_norm(f, f.graph.inputs(q)[0]);
        let mut append_nodes = vec![keys, values, k_rope];
        append_nodes.extend(k_norm);
        // When the new keys are the queries' own tokens (same rows, same
        // positions, same RoPE), the attention kernel appends them itself:
        // each tile writes the new rows of its key range before reading
        // them, and one kernel per layer fewer runs. A draft's keys, which
        // also span its context rows, keep their own kernel.
        let fused_append = {
            let g = &f.graph;
            let (qi, ki) = (g.inputs(q), g.inputs(k_rope));
            qi[1] == ki[1]
                && g.node(q).op == g.node(k_rope).op
                && g.node(q).ty.dims()[0] == g.node(k_rope).ty.dims()[0]
        };
        if !fused_append {
            f.groups.push(Group::new(
                KernelKind::RopeAppend {
                    k_append: keys,
                    v_append: values,
                    k_rope,
                    k_norm,
                },
                append_nodes.clone(),
            ));
        }
        // Over a full cache (thousands of positions) the keys are split across
        // tiles and merged by a second kernel, which then owns the output; a
        // sliding window's ring is read by one tile per query block.
        let Op::Attn(Attn::KvAppend { ring, .. }) = f.graph.node(keys).op else {
            unreachable!("checked above")
        };
        let split = !ring;
        let mut attn_nodes = vec![q];
        attn_nodes.extend(q_norm);
        if fused_append {
            attn_nodes.extend(append_nodes);
        }
        if !split {
            attn_nodes.push(a);
        }
        f.groups.push(Group::new(
            KernelKind::Attention {
                attn: a,
                q_rope: q,
                q_norm,
                append: keys,
                fused_append,
                split,
            },
            attn_nodes,
        ));
        if split {
            f.groups
                .push(Group::new(KernelKind::AttentionCombine { attn: a }, [a]));
        }
    }
    Ok(())
}
