"""The choices the training and sampler settings accept, in the order the ComfyUI nodes list
them: one home for the config classes' checks and the nodes' option lists. A leaf module (no
torch), so the nodes read it when the pack loads."""

#: `OptimizerConfig.optimizer`; the 8-bit ones need bitsandbytes, prodigy needs prodigyopt.
OPTIMIZERS = ("adamw", "adamw8bit", "lion", "lion8bit_paged", "prodigy")
#: `OptimizerConfig.grad_clip_mode`.
CLIP_MODES = ("norm", "value", "none")
#: `ScheduleConfig.lr_scheduler` (diffusers' schedulers).
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "polynomial")
#: `TrainConfig.flow_weighting_scheme`: how training timesteps are drawn.
WEIGHTING_SCHEMES = ("logit_normal", "uniform", "beta")
#: `TrainConfig.reference_frame`: the window's first frame, or a random one.
REFERENCE_FRAMES = ("first", "random")
#: `TrainConfig.mixed_precision`.
MIXED_PRECISION = ("auto", "no", "bf16")
#: The sampler's solvers (`SamplerConfig.scheduler`, `ValidationConfig.validation_scheduler`).
SAMPLER_SCHEDULERS = ("unipc", "euler")
#: `SamplerConfig.cfg_mode`: cond and uncond in one batch, or one after the other.
CFG_MODES = ("batch", "sequential")
