//! The observer passed into the forward pass: it receives, per prompt and MoE
//! layer, what the paper's dynamic analyses read (SPEC §5), without the model
//! knowing about analyses. When it asks for nothing extra, no extra work is done.

/// What an observer wants beyond routing (which is always reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wants {
    /// Every routed expert evaluated on the layer input (before routing weights).
    pub all_expert_outputs: bool,
    /// `act(gate·x)` of every routed expert on the layer input.
    pub activations: bool,
    /// The shared expert's output on the layer input.
    pub shared_output: bool,
    /// The layer input hidden state.
    pub input: bool,
}

/// One MoE layer's view of one prompt. Row-major host buffers: tokens × ….
pub struct MoeObservation<'a> {
    /// The checkpoint's layer index.
    pub layer: usize,
    /// Index of the prompt in the batch.
    pub prompt: usize,
    /// Tokens in the prompt.
    pub tokens: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Routed experts.
    pub experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Layer input `[tokens, hidden]` (after the pre-MoE norm), if wanted.
    pub input: Option<&'a [f32]>,
    /// Router logits `[tokens, experts]`.
    pub router_logits: &'a [f32],
    /// Gate scores `[tokens, experts]`: softmax of the logits (sigmoid for DeepSeek-V3).
    pub scores: &'a [f32],
    /// Selected experts `[tokens, k]`, by decreasing weight.
    pub selected: &'a [u32],
    /// Routing weights `[tokens, k]` as applied.
    pub weights: &'a [f32],
    /// All experts' outputs `[experts, tokens, hidden]`, if wanted.
    pub expert_outputs: Option<&'a [f32]>,
    /// All experts' `act(gate·x)` `[experts, tokens, intermediate]`, if wanted.
    pub activations: Option<&'a [f32]>,
    /// Intermediate size of one expert.
    pub intermediate: usize,
    /// Shared expert output `[tokens, hidden]` (unscaled), if the family has one and it is wanted.
    pub shared_output: Option<&'a [f32]>,
}

/// Receives observations from [`crate::forward::Forward::run`].
pub trait Observer {
    /// What to compute beyond routing.
    fn wants(&self) -> Wants {
        Wants::default()
    }
    /// Called once per prompt and MoE layer, in layer order.
    fn moe_layer(&mut self, _obs: &MoeObservation<'_>) {}
    /// Called when every prompt has gone through decoder layer `layer` (for progress).
    fn layer_done(&mut self, _layer: usize) {}
}

/// Observes nothing.
impl Observer for () {}
