//! Checkpoints: config parsing, family adapters, safetensors through mmap, and
//! the one view of "MoE layer: router, experts, shared experts" that analyses use.

pub mod config;
pub mod family;
pub mod infer;
pub mod quant;
pub mod safetensors;
internal_mod!(writer);

use std::path::{Path, PathBuf};

pub use config::Config;
pub use family::{DenseInfo, ExpertSource, Family, FusedKind, ModelInfo, Naming};
pub use safetensors::{Dtype, TensorView, Weights};

use crate::error::{Error, Result};

/// The three matrices of a SwiGLU expert, named as in the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Matrix {
    /// Up projection.
    Up,
    /// Gate projection.
    Gate,
    /// Down projection.
    Down,
}

impl Matrix {
    /// In the order the paper (and every report) shows them.
    pub const ALL: [Matrix; 3] = [Matrix::Up, Matrix::Gate, Matrix::Down];

    /// Name as used in reports: `up`, `gate` or `down`.
    pub fn name(self) -> &'static str {
        match self {
            Matrix::Up => "up",
            Matrix::Gate => "gate",
            Matrix::Down => "down",
        }
    }
}

/// One expert's (or dense FFN's) matrices: `gate`, `up` `[I, hidden]`, `down` `[hidden, I]`.
#[derive(Debug, Clone, Copy)]
pub struct ExpertView<'a> {
    /// Gate projection.
    pub gate: TensorView<'a>,
    /// Up projection.
    pub up: TensorView<'a>,
    /// Down projection.
    pub down: TensorView<'a>,
}

impl<'a> ExpertView<'a> {
    /// The view of matrix `m`.
    pub fn matrix(&self, m: Matrix) -> TensorView<'a> {
        match m {
            Matrix::Up => self.up,
            Matrix::Gate => self.gate,
            Matrix::Down => self.down,
        }
    }
}

/// What an analysis sees of one MoE layer: no tensor names, just roles.
#[derive(Debug, Clone)]
pub struct MoeLayerView<'a> {
    /// The checkpoint's own layer index.
    pub layer: usize,
    /// Router matrix `[E, hidden]`.
    pub router: TensorView<'a>,
    /// Routed experts in checkpoint order.
    pub experts: Vec<ExpertView<'a>>,
    /// Shared expert(s), fused into one SwiGLU block, if the family has them.
    pub shared: Option<ExpertView<'a>>,
}

/// An opened MoE checkpoint.
pub struct Model {
    /// Geometry derived from config.json.
    pub info: ModelInfo,
    /// The parsed config.json.
    pub config: Config,
    weights: Weights,
    label: String,
    dtype: Dtype,
    naming: Naming,
    notice: Option<String>,
    /// Rows of the router: the routed experts, then any zero-computation
    /// (identity) experts (LongCat-Flash), whose rows the analyses skip.
    router_rows: usize,
}

impl Model {
    /// Opens an HF model directory (config.json + safetensors, sharded or not)
    /// and validates every tensor the analyses need (names, shapes, dtypes)
    /// from the headers alone.
    ///
    /// ```rust
    /// use moe_inspect::model::Model;
    ///
    /// // A directory without config.json and safetensors is an error, not a panic.
    /// let missing = std::env::temp_dir().join("moe-inspect-doc-no-such-model");
    /// assert!(Model::open(&missing).is_err());
    /// ```
    pub fn open(dir: &Path) -> Result<Model> {
        // A `.gguf` file, or a folder holding one (and no config.json).
        if let Some(file) = quant::gguf::find(dir)? {
            let (config, weights) = quant::gguf::open(&file)?;
            let info = ModelInfo::from_config(&config)?;
            return Model::from_parts(info, config, weights, file.display().to_string());
        }
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        let config = Config::read_dir(dir)?;
        let mut weights = Weights::open_dir(dir)?;
        // Quantised checkpoints: their weights are decoded on read.
        quant::attach(&mut weights, &config)?;
        if Family::recognise(&config)?.is_some() {
            let info = ModelInfo::from_config(&config)?;
            return Model::from_parts(info, config, weights, dir.display().to_string());
        }
        // A family the table does not know: its MoE structure from the tensors.
        let inferred = infer::infer(&config, &weights)?;
        let mut model =
            Model::from_parts(inferred.info, config, weights, dir.display().to_string())?;
        debug_assert_eq!(model.naming, inferred.naming);
        model.notice = Some(inferred.notice);
        Ok(model)
    }

    /// What was inferred about a checkpoint whose family the table does not
    /// know (for stderr), `None` for a known family.
    pub fn notice(&self) -> Option<&str> {
        self.notice.as_deref()
    }

    /// The trained demo model embedded in the binary (a 4-layer Mixtral with
    /// 8 experts, top-2): examples and tests run on it without any files.
    ///
    /// ```rust
    /// use moe_inspect::model::Model;
    ///
    /// let model = Model::demo()?;
    /// assert_eq!(model.info.num_experts, 8);
    /// assert_eq!(model.info.top_k, 2);
    /// let layer = model.moe_layer(model.info.moe_layers[0])?;
    /// assert_eq!(layer.experts.len(), 8);
    /// # Ok::<(), moe_inspect::Error>(())
    /// ```
    #[cfg(feature = "demo")]
    pub fn demo() -> Result<Model> {
        let label = PathBuf::from(crate::demo::LABEL);
        let config = Config::parse(&label.join("config.json"), crate::demo::CONFIG)?;
        let info = ModelInfo::from_config(&config)?;
        let weights = Weights::from_static(&label, crate::demo::WEIGHTS)?;
        Model::from_parts(info, config, weights, crate::demo::LABEL.to_string())
    }

    fn from_parts(
        info: ModelInfo,
        config: Config,
        mut weights: Weights,
        label: String,
    ) -> Result<Model> {
        let mut naming = detect_naming(&info, &weights);
        let method = config
            .get("quantization_config")
            .and_then(|q| q.get("quant_method"))
            .and_then(|m| m.as_str());
        if method == Some("mxfp4") {
            // gpt-oss: the fused experts' `_blocks`/`_scales`, under the table's names.
            quant::mxfp4::register_family(&mut weights, &info, &naming)?;
            naming = detect_naming(&info, &weights);
        }
        let zero = match info.family.spec().zero_experts_key {
            Some(key) => {
                let text = config.text_config();
                text.as_ref()
                    .unwrap_or(&config)
                    .usize_opt_in(key, 0, crate::model::config::limits::EXPERTS)?
                    .unwrap_or(0)
            }
            None => 0,
        };
        // Both are at most limits::EXPERTS.
        let router_rows = info.num_experts + zero;
        let mut model = Model {
            info,
            config,
            weights,
            label,
            dtype: Dtype::F32,
            naming,
            notice: None,
            router_rows,
        };
        model.check_layer_count()?;
        model.dtype = model.validate()?;
        Ok(model)
    }

    /// `num_hidden_layers` must not promise layers the checkpoint does not
    /// hold: a config that claims more (a corrupt or mismatched config.json)
    /// is named as such rather than as a missing tensor of some layer.
    fn check_layer_count(&self) -> Result<()> {
        let info = &self.info;
        let last = info.moe_layers.last().copied().unwrap_or(0);
        if self.weights.contains(&self.naming.router(last)) {
            return Ok(());
        }
        let held = self
            .weights
            .names()
            .into_iter()
            .filter_map(family::layer_of)
            .max()
            .map_or(0, |l| l + 1);
        if info.num_layers > held {
            return Err(Error::key(
                self.config.path(),
                info.family.spec().layers_key,
                format!(
                    "is {}, but the checkpoint holds tensors of {held} layers only",
                    info.num_layers
                ),
            ));
        }
        Ok(())
    }

    /// Checks names, shapes and dtypes of every routed/shared expert and router;
    /// returns the dtype of the experts.
    fn validate(&self) -> Result<Dtype> {
        let info = &self.info;
        let (h, i) = (info.hidden_size, info.expert_intermediate);
        let n = info.num_experts;
        let mut dtype = None;
        for &layer in &info.moe_layers {
            let router = self.naming.router(layer);
            self.weights.expect_shape(&router, &[self.router_rows, h])?;
            self.weights.tensor(&router)?;
            for e in 0..n {
                match self.naming.expert_source(layer, e) {
                    ExpertSource::Separate(names) => {
                        self.check_swiglu(&names, h, i)?;
                        dtype.get_or_insert(self.weights.tensor(&names[0])?.dtype);
                    }
                    ExpertSource::Fused {
                        gate_up,
                        down,
                        kind,
                        ..
                    } => {
                        // The stacked tensors hold every expert: checked once.
                        if e > 0 {
                            continue;
                        }
                        let two_i = i.checked_mul(2).ok_or_else(|| {
                            Error::key(self.config.path(), "intermediate_size", "overflows")
                        })?;
                        let (gu, d): (Vec<usize>, Vec<usize>) = match kind {
                            // Zero experts (LongCat) have gate/up slots too, no down.
                            FusedKind::GateUpRows => {
                                (vec![self.router_rows, two_i, h], vec![n, h, i])
                            }
                            FusedKind::InterleavedColumns | FusedKind::ConcatColumns => {
                                (vec![n, h, two_i], vec![n, i, h])
                            }
                            FusedKind::RowStacks { up } => {
                                let ni = n.checked_mul(i).ok_or_else(|| {
                                    Error::key(self.config.path(), "intermediate_size", "overflows")
                                })?;
                                let up = self.naming.layer_tensor(layer, up);
                                self.weights.expect_shape(&up, &[ni, h])?;
                                self.weights.tensor(&up)?;
                                (vec![ni, h], vec![ni, h])
                            }
                        };
                        self.weights.expect_shape(&gate_up, &gu)?;
                        self.weights.expect_shape(&down, &d)?;
                        let t = self.weights.tensor(&gate_up)?;
                        self.weights.tensor(&down)?;
                        dtype.get_or_insert(t.dtype);
                    }
                }
            }
            if info.shared_intermediate > 0 {
                if let Some(names) = self.naming.shared(layer) {
                    self.check_swiglu(&names, h, info.shared_intermediate)?;
                }
            }
        }
        Ok(dtype.unwrap_or(Dtype::F32))
    }

    fn check_swiglu(&self, names: &[String; 3], h: usize, i: usize) -> Result<()> {
        self.weights.expect_shape(&names[0], &[i, h])?;
        self.weights.expect_shape(&names[1], &[i, h])?;
        self.weights.expect_shape(&names[2], &[h, i])?;
        for n in names {
            self.weights.tensor(n)?;
        }
        Ok(())
    }

    /// The model in `dir`, or the embedded demo model when `dir` is `None`
    /// (an error naming the `demo` feature when the library is built without it).
    pub fn open_or_demo(dir: Option<&Path>) -> Result<Model> {
        match dir {
            Some(dir) => Model::open(dir),
            #[cfg(feature = "demo")]
            None => Model::demo(),
            #[cfg(not(feature = "demo"))]
            None => Err(no_demo()),
        }
    }

    /// Where the model came from (directory, or `<demo>`), for reports.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Storage dtype of the experts.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The checkpoint's tensors (for adapters and tools that need raw access).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The view of one MoE layer. Fails with a usage error for dense layers.
    pub fn moe_layer(&self, layer: usize) -> Result<MoeLayerView<'_>> {
        let info = &self.info;
        if !info.moe_layers.contains(&layer) {
            return Err(Error::Usage(format!(
                "layer {layer} of {} is not an MoE layer (MoE layers: {})",
                self.label,
                crate::layers::format_list(&info.moe_layers)
            )));
        }
        let experts = (0..info.num_experts)
            .map(|e| self.expert(layer, e))
            .collect::<Result<Vec<_>>>()?;
        let shared = match self.naming.shared(layer) {
            Some(names) if info.shared_intermediate > 0 => Some(self.swiglu(&names)?),
            _ => None,
        };
        let mut router = self.weights.tensor(&self.naming.router(layer))?;
        if self.router_rows > info.num_experts {
            // The zero experts' rows come after the routed experts'.
            router = router.part(0, &[info.num_experts, info.hidden_size])?;
        }
        Ok(MoeLayerView {
            layer,
            router,
            experts,
            shared,
        })
    }

    /// How this checkpoint names its tensors (layer prefix, per-expert or fused experts).
    pub fn naming(&self) -> Naming {
        self.naming
    }

    /// Routed expert `e` of a layer: its own tensors, or its part of the
    /// stacked ones (viewed in place; the same `[I, H]`, `[I, H]`, `[H, I]`
    /// matrices either way).
    pub fn expert(&self, layer: usize, e: usize) -> Result<ExpertView<'_>> {
        match self.naming.expert_source(layer, e) {
            ExpertSource::Separate(names) => self.swiglu(&names),
            ExpertSource::Fused {
                gate_up,
                down,
                kind,
                index,
            } => {
                // MXFP4 experts: each expert's matrices are registered on open.
                let mx = quant::mxfp4::expert_names(&gate_up, &down, index);
                if self.weights.contains(&mx[0]) {
                    return self.swiglu(&mx);
                }
                let (h, i) = (self.info.hidden_size, self.info.expert_intermediate);
                let gu = self.weights.tensor(&gate_up)?;
                let d = self.weights.tensor(&down)?;
                // Shapes were validated on open: [E, 2I, H] / [E, H, 2I] and
                // [E, H, I] / [E, I, H], so these products fit.
                let per = 2 * i * h;
                let first = index * per;
                Ok(match kind {
                    FusedKind::GateUpRows => ExpertView {
                        gate: gu.part(first, &[i, h])?,
                        up: gu.part(first + i * h, &[i, h])?,
                        down: d.slab(index)?,
                    },
                    FusedKind::InterleavedColumns => ExpertView {
                        gate: gu.strided(first, i, h, 2, 2 * i)?,
                        up: gu.strided(first + 1, i, h, 2, 2 * i)?,
                        down: d.strided(index * i * h, h, i, 1, h)?,
                    },
                    FusedKind::ConcatColumns => ExpertView {
                        gate: gu.strided(first, i, h, 1, 2 * i)?,
                        up: gu.strided(first + i, i, h, 1, 2 * i)?,
                        down: d.strided(index * i * h, h, i, 1, h)?,
                    },
                    FusedKind::RowStacks { up } => {
                        let v = self.weights.tensor(&self.naming.layer_tensor(layer, up))?;
                        let first = index * i * h;
                        ExpertView {
                            gate: gu.part(first, &[i, h])?,
                            up: v.part(first, &[i, h])?,
                            // down[r][c] = w2[e·I + c][r].
                            down: d.strided(first, h, i, 1, h)?,
                        }
                    }
                })
            }
        }
    }

    fn swiglu(&self, names: &[String; 3]) -> Result<ExpertView<'_>> {
        swiglu_view(&self.weights, names)
    }

    /// Tensor names of one MoE layer: router, routed experts, shared experts.
    fn layer_tensor_names(&self, layer: usize) -> Vec<String> {
        let mut names = vec![self.naming.router(layer)];
        names.extend(self.naming.expert_tensors(layer, self.info.num_experts));
        if let Some(s) = self.naming.shared(layer) {
            names.extend(s);
        }
        names
    }

    /// Drops a finished layer's pages from resident memory (see [`Weights::release`]).
    pub fn release_layer(&self, layer: usize) {
        let names = self.layer_tensor_names(layer);
        self.weights.release(names.iter().map(String::as_str));
    }
}

/// The naming whose router and first expert exist at the first MoE layer:
/// each layer prefix, per-expert layout before fused. When none fits, the
/// family's canonical naming (validation then names the missing tensor).
fn detect_naming(info: &ModelInfo, weights: &Weights) -> Naming {
    let layer = info.moe_layers.first().copied().unwrap_or(0);
    let spec = info.family.spec();
    let layouts = spec
        .per_expert
        .map(|_| None)
        .into_iter()
        .chain((0..spec.fused.len()).map(|i| Some(i as u8)));
    let layouts: Vec<Option<u8>> = layouts.collect();
    for prefix in family::LAYER_PREFIXES {
        for &fused in &layouts {
            let naming = Naming {
                family: info.family,
                prefix,
                fused,
            };
            if weights.contains(&naming.router(layer))
                && weights.contains(&naming.expert(layer, 0)[0])
            {
                return naming;
            }
        }
    }
    info.family.naming()
}

fn swiglu_view<'a>(weights: &'a Weights, names: &[String; 3]) -> Result<ExpertView<'a>> {
    Ok(ExpertView {
        gate: weights.tensor(&names[0])?,
        up: weights.tensor(&names[1])?,
        down: weights.tensor(&names[2])?,
    })
}

/// A dense model whose FFNs are compared with the experts (`--dense-reference`).
pub struct DenseModel {
    /// Geometry derived from the dense model's config.json.
    pub info: DenseInfo,
    weights: Weights,
    dir: PathBuf,
}

impl DenseModel {
    /// Opens a dense HF checkpoint (Mistral, Llama, Qwen2...).
    pub fn open(dir: &Path) -> Result<DenseModel> {
        let config = Config::read_dir(dir)?;
        let info = DenseInfo::from_config(&config)?;
        let mut weights = Weights::open_dir(dir)?;
        quant::attach(&mut weights, &config)?;
        Ok(DenseModel {
            info,
            weights,
            dir: dir.to_path_buf(),
        })
    }

    /// Checks that its FFN has the shape of the MoE model's experts.
    pub fn check_compatible(&self, moe: &ModelInfo) -> Result<()> {
        if self.info.hidden_size != moe.hidden_size
            || self.info.intermediate_size != moe.expert_intermediate
        {
            return Err(Error::Incompatible {
                path: self.dir.join("config.json"),
                reason: format!(
                    "dense reference has hidden {} × intermediate {}, but the experts are {} × {}",
                    self.info.hidden_size,
                    self.info.intermediate_size,
                    moe.hidden_size,
                    moe.expert_intermediate
                ),
            });
        }
        Ok(())
    }

    /// The FFN of a layer as an expert-shaped view.
    pub fn ffn(&self, layer: usize) -> Result<ExpertView<'_>> {
        if layer >= self.info.num_layers {
            return Err(Error::Incompatible {
                path: self.dir.join("config.json"),
                reason: format!(
                    "dense reference has {} layers, no layer {layer}",
                    self.info.num_layers
                ),
            });
        }
        let names = family::swiglu_names(&format!("model.layers.{layer}.mlp"));
        let (h, i) = (self.info.hidden_size, self.info.intermediate_size);
        self.weights.expect_shape(&names[0], &[i, h])?;
        self.weights.expect_shape(&names[1], &[i, h])?;
        self.weights.expect_shape(&names[2], &[h, i])?;
        swiglu_view(&self.weights, &names)
    }

    /// Drops a finished layer's FFN pages from resident memory.
    pub fn release_layer(&self, layer: usize) {
        let names = family::swiglu_names(&format!("model.layers.{layer}.mlp"));
        self.weights.release(names.iter().map(String::as_str));
    }
}

/// The error for "no model given" in a build without the demo model.
#[cfg(not(feature = "demo"))]
pub(crate) fn no_demo() -> Error {
    Error::Invalid(
        "no model given, and this build has no demo model (the `demo` cargo feature is off)".into(),
    )
}
