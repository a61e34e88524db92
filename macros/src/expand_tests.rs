//! Snapshots of expansions of the core constructs (reviewed with `cargo insta review`).

use quote::quote;

fn expand(attr: proc_macro2::TokenStream, item: proc_macro2::TokenStream) -> String {
    let tokens = match crate::expand(attr, item) {
        Ok(t) => t,
        Err(e) => panic!("expansion failed: {e}"),
    };
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(e) => panic!("expansion does not parse: {e}\n{tokens}"),
    }
}

macro_rules! snapshot {
    ($name:literal, $value:expr) => {
        insta::with_settings!({ snapshot_path => "../tests/snapshots", prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!($name, $value);
        })
    };
}

/// Names, places, a `Tensor!` entry check, a formatted scope, declarations and a method chain.
#[test]
fn norm_linear() {
    let out = expand(
        quote!(scope = "layer{i}"),
        quote! {
            /// Norm, then a projection.
            pub fn norm_linear(i: usize, x: Tensor![T, hid], hid: usize) -> NodeId {
                let norm = weight!("layers.{i}.norm", bf16, [hid]);
                let w = weight!("layers.{i}.proj", mxfp4, [2 * hid, hid]);
                let h = x.rms_norm(&norm, 1e-6);
                h.matmul(w).reshape([T, 2, hid])
            }
        },
    );
    snapshot!("norm_linear", out);
}

/// Operators, a graph call nested in an operator, and hoisting of operands.
#[test]
fn residual_call() {
    let out = expand(
        quote!(scope = "", calls(attn)),
        quote! {
            fn block(x: NodeId, pos: NodeId, eps: f32) -> NodeId {
                let y = x + attn(x.silu(), pos) * 0.5;
                -y
            }
        },
    );
    snapshot!("residual_call", out);
}

/// Control flow: a tensor `if`, a loop with assignment, `Some(weight!(..))`, `output!`.
#[test]
fn control_flow() {
    let out = expand(
        quote!(calls(layer)),
        quote! {
            fn stack(x: NodeId, n: usize, dense: bool) {
                let mut h = x;
                for i in 0..n {
                    h = layer(h, i);
                }
                let bias = if dense { None } else { Some(weight!("bias", f32, [8])) };
                let m = if dense { h.silu() } else { h.matmul_to(weight!("w", bf16, [8, 8]), f32) };
                output!("y", m);
            }
        },
    );
    snapshot!("control_flow", out);
}
