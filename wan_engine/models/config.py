"""Model configuration read straight from a Diffusers snapshot's `config.json` files.

Each dataclass mirrors the constructor arguments of the reference class, with the same names and defaults, so a
reader can hold this file next to the diffusers/transformers source. Unknown keys in `config.json` are ignored.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# The TI2V-5B configs that apply when a model folder holds none (configs/README.md says where each value came from)
SHIPPED_CONFIGS = Path(__file__).parent / "configs"


class _FromDict:
    @classmethod
    def from_dict(cls, params: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @classmethod
    def from_file(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class TransformerConfig(_FromDict):
    """diffusers `WanTransformer3DModel` (TI2V-5B: 24 heads x 128, 30 layers, 48 channels)."""

    patch_size: tuple = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int = None
    added_kv_proj_dim: int = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int = None

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)
        self.out_channels = self.out_channels or self.in_channels

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class VAEConfig(_FromDict):
    """diffusers `AutoencoderKLWan` (Wan2.2 variant: z_dim 48, patch_size 2, is_residual)."""

    base_dim: int = 96
    decoder_base_dim: int = None
    z_dim: int = 16
    dim_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_scales: list = field(default_factory=list)
    temperal_downsample: list = field(default_factory=lambda: [False, True, True])
    dropout: float = 0.0
    latents_mean: list = None
    latents_std: list = None
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int = None
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8

    def __post_init__(self):
        self.decoder_base_dim = self.decoder_base_dim or self.base_dim


@dataclass
class TextEncoderConfig(_FromDict):
    """transformers `UMT5Config` (the encoder half is all we use)."""

    vocab_size: int = 250112
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"


@dataclass
class SchedulerConfig(_FromDict):
    """diffusers `UniPCMultistepScheduler` as Wan2.2 ships it (flow prediction with flow sigmas)."""

    num_train_timesteps: int = 1000
    solver_order: int = 2
    prediction_type: str = "flow_prediction"
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: list = field(default_factory=list)
    use_flow_sigmas: bool = True
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"
