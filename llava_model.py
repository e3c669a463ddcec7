"""LLaVA-1.5, self-contained: the CLIP vision tower, the projector, image preprocessing and the prompt format.

This file owns the vision-language model of the paper's second experiment, LLaVA-1.5 (Liu, Li, Li & Lee,
2023, "Improved Baselines with Visual Instruction Tuning"), as the `llava-hf/llava-1.5-7b-hf` checkpoint
lays it out (`model_type` "llava"; the vision tower of `openai/clip-vit-large-patch14-336`):

    image   pad to a centered square of CLIP's mean color, resize to 336, normalize    (3, 336, 336)
    vision  CLIP ViT (Radford et al., 2021): 14x14 patches -> 576 patch tokens + CLS, pre-LN encoder layers;
            the features are the hidden states after the second-to-last layer, CLS dropped   (576, 1024)
    project linear_2(GELU(linear_1(features)))                                              (576, hidden)
    prompt  the embedded text with each `<image>` placeholder replaced by its image's 576 features
    text    the LLaMA (Vicuna) language model of llama_model.py, unchanged, on the embedded prompt

The API (what eval_vqa.py and mumoe.py use):

    model = load_llava(name_or_dir, device, dtype)     strictly loaded; models.load_model dispatches "llava" here
    tokenizer = load_tokenizer(name_or_dir)            the language model's (Llama's, BOS added)
    image = load_image(path)                           Pillow RGB; a file that does not open is a UsageError
    pixels = preprocess(image, size=336)               (3, 336, 336) float32, as LLaVA-1.5's evaluation does it
    prompt = conversation_prompt(message, has_image)   the vicuna_v1 prompt: "... USER: <image>\n{message} ASSISTANT:"
    check_placeholders(prompt, n_images)               one <image> per image, else a UsageError (no model needed)
    ids = prompt_ids(tokenizer, prompt, model.config.image_token_index)     list[int], one image id per <image>
    x = model.embed_prompt(ids, pixels)                (1, T, hidden): each image id replaced by its 576 features;
                                                       pixels (N, 3, 336, 336) or (3, 336, 336); None: text only
    model.language_model                               the LLaMA, with checkpoint.py's interface (blocks, head ...)
    model.config                                       LlavaConfig: vision_config, text_config, image_token_index ...
    model.image_features(pixels) -> (N, 576, hidden)   vision tower + projector
    model(ids, pixels) -> (1, T, vocab)                dense logits at every position of the embedded prompt
    model.vision_encoder()                             the vision layers the features need, as a model for
                                                       mumoe.count_macs and pruners.prune_model

Greedy generation, dense or μ-MoE (each prompt, its image features included, routed on itself):

    new_ids = mumoe.generate(model.language_model, model.embed_prompt(ids, pixels), max_new_tokens,
                             mumoe.MuMoE(rho), eos_id=model.language_model.config.eos_token_id)

The offline pruners calibrate on embedded prompts: pruners.prune_model(model.language_model,
[model.embed_prompt(ids_i, pixels_i) ...], "wanda", rho). The method files see a language model and embedded
prompts, never an image. To route the vision tower's Linears on each image too, embed with
`model.embed_prompt(ids, pixels, vision_block=mumoe.routed_block(mumoe.MuMoE(rho)))`.

Preprocessing (LLaVA's `process_images` with `image_aspect_ratio="pad"`, as its eval scripts run it):
the image is opened and converted to RGB with Pillow (`Image.convert("RGB")`: an alpha channel is dropped,
not composited), pasted into a square of side max(w, h) filled with (122, 116, 104) -- int(255 * CLIP mean)
-- at offset ((side - w) // 2, (side - h) // 2), then CLIP's `CLIPImageProcessor`: shortest edge to 336
with Pillow's bicubic filter on the 8-bit image, center crop 336, rescale by 1/255, normalize with CLIP's
mean and std. Where transformers differs: its `LlavaProcessor` (and `CLIPImageProcessor`) does not pad,
so a non-square image loses its borders to the center crop; transformers 5 composites transparent pixels
over white where Pillow's `convert("RGB")` drops the alpha channel.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import llama_model
from checkpoint import (LinearFn, UsageError, check_device, check_dtype, dense_linear, empty_modules, load_weights,
                        read_config_json, resolve_checkpoint)

# -----------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower's shape. transformers writes a sub-config as its difference from the defaults of its
    class, so a key that `vision_config` leaves out means the default of transformers' CLIPVisionConfig
    (ViT-B/32 at 224 px), the defaults here; LLaVA-1.5's tower is CLIP_VIT_L_336 below."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UsageError(f"vision hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise UsageError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in VISION_ACTIVATIONS:
            raise UsageError(f"vision hidden_act {self.hidden_act!r} is not one of {sorted(VISION_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, raw: dict) -> "CLIPVisionConfig":
        if raw.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise UsageError(f"vision_config describes a {raw['model_type']!r} tower: only CLIP's "
                             "(clip_vision_model) is supported")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x), which its weights were trained with."""
    return x * torch.sigmoid(1.702 * x)


VISION_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}
PROJECTOR_ACTIVATIONS = {"gelu": F.gelu}  # exact (erf) GELU, as LLaVA's mlp2x_gelu projector

# openai/clip-vit-large-patch14-336, LLaVA-1.5's vision tower (ViT-L/14 at 336 pixels)
CLIP_VIT_L_336 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14)

# -----------------------------------------------------------------------------
# The CLIP vision tower. Module names are the checkpoint's: vision_tower.vision_model.encoder.layers.0.mlp.fc1 ...


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.n_head = config.num_attention_heads
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.q_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (linear(proj, x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        # y = softmax(q k^T / sqrt(hs)) v: every patch sees every patch (no mask)
        y = F.scaled_dot_product_attention(q, k, v)
        return linear(self.out_proj, y.transpose(1, 2).reshape(B, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.activation = VISION_ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear) -> torch.Tensor:
        return linear(self.fc2, self.activation(linear(self.fc1, x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN: h = h + attn(LN1(h)); h = h + mlp(LN2(h))."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def linears(self) -> dict[str, nn.Linear]:
        """The six Linears, by checkpoint name, in the order the forward pass uses them."""
        attn = self.self_attn
        return {"self_attn.q_proj": attn.q_proj, "self_attn.k_proj": attn.k_proj, "self_attn.v_proj": attn.v_proj,
                "self_attn.out_proj": attn.out_proj, "mlp.fc1": self.mlp.fc1, "mlp.fc2": self.mlp.fc2}

    def forward(self, x: torch.Tensor, linear: LinearFn = dense_linear, cache=None) -> torch.Tensor:
        """`cache` is accepted for the block interface and must be None: an image is encoded in one pass."""
        if cache is not None:
            raise ValueError("the vision tower has no KV cache: it encodes a whole image at once")
        x = x + self.self_attn(self.layer_norm1(x), linear)
        return x + self.mlp(self.layer_norm2(x), linear)


class CLIPVisionEmbeddings(nn.Module):
    """Patches of the image -> tokens: [CLS, patch_1 ... patch_N] + learned positions (B, 1 + N, d)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        B, _, H, W = pixel_values.shape
        if (H, W) != (self.image_size, self.image_size):  # the learned positions are those of one grid
            raise UsageError(f"pixel values of {H}x{W} for a vision tower of {self.image_size}x{self.image_size}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, d, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, d), row by row
        cls = self.class_embedding.expand(B, 1, -1)  # (B, 1, d)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + N, d)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = CLIPEncoder(config)
        # CLIP's pooled output (the CLS token after the last layer) goes through it; LLaVA never reads it,
        # but the checkpoint holds it, and every key is accounted for
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPVisionModel(nn.Module):
    """The vision tower: `vision_model` holds the transformer (its name in the checkpoint)."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vision_model.encoder.layers

    def hidden_states(self, pixel_values: torch.Tensor, layers: int, block=None) -> torch.Tensor:
        """Pixels (B, 3, H, W) -> the hidden states after the first `layers` encoder layers (B, 1 + N, d).

        transformers' `hidden_states[i]` is the state after i layers ([0]: the embeddings after pre_layrnorm).
        `block(layer, x)`: how to run one layer (default: dense), e.g. routed per image by μ-MoE.
        """
        x = self.vision_model.pre_layrnorm(self.vision_model.embeddings(pixel_values))
        for layer in self.blocks[:layers]:
            x = layer(x) if block is None else block(layer, x)
        return x


class CLIPFeatureEncoder(nn.Module):
    """The first `layers` encoder layers of a tower (those LLaVA's features need), offering what the method files
    read of a model: `blocks`, `blocks_key`, `config` (mumoe.count_macs, pruners.prune_model on embedded images).
    It shares the tower's modules: pruning it prunes the tower. Its `layers.0.mlp.fc1` is the checkpoint's
    `vision_tower.vision_model.encoder.layers.0.mlp.fc1`."""

    blocks_key = "layers"

    def __init__(self, tower: CLIPVisionModel, layers: int):
        super().__init__()
        self.config = tower.config
        self.layers = nn.ModuleList(tower.blocks[:layers])

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers


class LlavaMultiModalProjector(nn.Module):
    """Vision features -> the language model's embedding space: linear_2(GELU(linear_1(x)))."""

    def __init__(self, vision_hidden: int, text_hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=bias)
        self.activation = PROJECTOR_ACTIVATIONS[activation]
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


# -----------------------------------------------------------------------------
# Images: LLaVA-1.5's evaluation preprocessing, with Pillow

# OpenAI CLIP's normalization (openai/clip-vit-large-patch14-336's preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# LLaVA's expand2square background: the mean color in 8 bits, truncated as LLaVA computes it
PAD_COLOR = tuple(int(255 * m) for m in CLIP_MEAN)  # (122, 116, 104)


def load_image(path):
    """Open an image file as RGB, as LLaVA's eval scripts do (`Image.open(path).convert("RGB")`)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"image {path} not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UsageError(f"image {path} could not be opened ({type(e).__name__}: {e})") from None


def expand_to_square(image, color=PAD_COLOR):
    """Pad a Pillow image to a square of side max(w, h), the image centered (offset rounded down), the rest
    filled with `color`: LLaVA's `expand2square`, used with image_aspect_ratio="pad"."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def clip_transform(image, size: int = 336) -> torch.Tensor:
    """CLIPImageProcessor on a Pillow image: RGB, shortest edge to `size` (bicubic, 8-bit), center crop
    size x size, rescale by 1/255, normalize with CLIP's mean and std -> (3, size, size) float32."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    # the short side becomes `size`, the long side int(size * long / short): transformers' rounding
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(new_h, new_w, 3)
    pixels = pixels[top:top + size, left:left + size].permute(2, 0, 1).float() / 255  # (3, size, size) in [0, 1]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def preprocess(image, size: int = 336, aspect_ratio: str = "pad") -> torch.Tensor:
    """A Pillow image -> pixel values (3, size, size), as LLaVA-1.5's evaluation prepares an image.

    aspect_ratio="pad" (LLaVA-1.5): pad to a centered square of the mean color, then CLIP's transform.
    aspect_ratio="crop": CLIP's transform alone (what transformers' LlavaProcessor does): the borders of
    a non-square image are cropped away.
    """
    if aspect_ratio not in ASPECT_RATIOS:
        raise UsageError(f"image_aspect_ratio {aspect_ratio!r} is not supported: give one of {ASPECT_RATIOS}")
    image = image.convert("RGB")
    if aspect_ratio == "pad":
        image = expand_to_square(image)
    return clip_transform(image, size)


ASPECT_RATIOS = ("pad", "crop")

# -----------------------------------------------------------------------------
# The prompt: LLaVA-1.5's vicuna_v1 conversation, tokenized around the image as LLaVA does

IMAGE_PLACEHOLDER = "<image>"
# LLaVA's conv_vicuna_v1 system message
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN_INDEX = 32000  # llava-hf's `image_token_index`: the id of "<image>" in its tokenizer


def conversation_prompt(message: str, has_image: bool) -> str:
    """The vicuna_v1 prompt of one user turn, as LLaVA-1.5's eval scripts build it:

        "{system} USER: <image>\\n{message} ASSISTANT:"

    With an image, "<image>\\n" goes in front of the message, unless the message already places its
    `<image>` (LLaVA's run_llava.py keeps it where it is). The separator after the system text and
    after the message is one space (sep_style TWO, sep=" ").
    """
    if has_image and IMAGE_PLACEHOLDER not in message:
        message = f"{IMAGE_PLACEHOLDER}\n{message}"
    return f"{VICUNA_V1_SYSTEM} USER: {message} ASSISTANT:"


def check_placeholders(prompt: str, n_images: int) -> None:
    """One `<image>` in the prompt per image, before any model work: a UsageError names the mismatch."""
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n != n_images:
        raise UsageError(f"the prompt has {n} {IMAGE_PLACEHOLDER} placeholders for {n_images} images"
                         + (": give one <image> in the prompt per image" if n_images > 1 else ""))


def prompt_ids(tokenizer, prompt: str, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Token ids of a prompt, with `image_token_index` where each `<image>` was: LLaVA's tokenizer_image_token.

    The text between placeholders is tokenized piece by piece, each piece as if it were a whole prompt
    (so a piece after an image starts as a fresh text does: Llama's tokenizer puts "▁" before it), the
    tokens the tokenizer puts before any text (Llama's BOS) are kept once, at the very start, and dropped
    from every piece.
    """
    lead = tokenizer.encode("")  # what the tokenizer puts before any text: [BOS] for Llama
    ids = list(lead)
    for i, piece in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            ids.append(image_token_index)
        tokens = tokenizer.encode(piece)
        if tokens[:len(lead)] != lead:
            raise ValueError(f"the tokenizer does not start {piece!r} with {lead} as it starts an empty text")
        ids += tokens[len(lead):]
    return ids


# -----------------------------------------------------------------------------
# LLaVA: config, model, loading

# model_types of the LLaVA family that are not LLaVA-1.5, refused by name
OTHER_VARIANTS = {
    "llava_next": "LLaVA-NeXT (LLaVA-1.6, anyres tiling)", "llava_next_video": "LLaVA-NeXT-Video",
    "llava_onevision": "LLaVA-OneVision", "vipllava": "ViP-LLaVA", "llava_llama": "the original liuhaotian/* LLaVA",
    "llava_mistral": "the original liuhaotian/* LLaVA", "llava_mpt": "the original liuhaotian/* LLaVA",
}
ORIGINAL_LLAVA = ("the original liuhaotian/* LLaVA checkpoints are not supported (another layout): use their "
                  "llava-hf/* conversions, e.g. llava-hf/llava-1.5-7b-hf (short name llava-1.5-7b)")


def unsupported_variant(model_type: str) -> str:
    return (f"{OTHER_VARIANTS[model_type]} (model_type {model_type!r}) is not supported: only LLaVA-1.5 "
            "(model_type 'llava', e.g. llava-hf/llava-1.5-7b-hf)")


FEATURE_STRATEGIES = ("default", "full")  # drop the CLS token, or keep it
# transformers writes text_config as its difference from the defaults of its LlamaConfig (Llama-7B's), so a key
# left out means that default: llava-1.5-7b-hf's text_config holds only vocab_size, max_position_embeddings and
# rms_norm_eps
LLAMA_CONFIG_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=2048,
                             rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)


@dataclass(frozen=True)
class LlavaConfig:
    vision_config: CLIPVisionConfig
    text_config: llama_model.LlamaConfig
    image_token_index: int = IMAGE_TOKEN_INDEX
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2  # the hidden states after the second-to-last layer (transformers' index)
    vision_feature_select_strategy: str = "default"
    multimodal_projector_bias: bool = True
    image_aspect_ratio: str = "pad"  # not in llava-hf's config.json: LLaVA-1.5's own value

    def __post_init__(self):
        L = self.vision_config.num_hidden_layers
        if not -L - 1 <= self.vision_feature_layer <= L:
            raise UsageError(f"vision_feature_layer {self.vision_feature_layer} is not a layer of a "
                             f"{L}-layer vision tower")
        if self.vision_feature_select_strategy not in FEATURE_STRATEGIES:
            raise UsageError(f"vision_feature_select_strategy {self.vision_feature_select_strategy!r} is not one "
                             f"of {FEATURE_STRATEGIES}")
        if self.projector_hidden_act not in PROJECTOR_ACTIVATIONS:
            raise UsageError(f"projector_hidden_act {self.projector_hidden_act!r} is not one of "
                             f"{sorted(PROJECTOR_ACTIVATIONS)}")
        if self.image_aspect_ratio != "pad":
            raise UsageError(f"image_aspect_ratio {self.image_aspect_ratio!r} is not supported: LLaVA-1.5 pads "
                             "(\"pad\"); anyres is LLaVA-NeXT's")

    @property
    def feature_layers(self) -> int:
        """How many vision layers the features need: layer -2 of 24 is the state after 23 layers."""
        layer = self.vision_feature_layer
        return layer if layer >= 0 else self.vision_config.num_hidden_layers + 1 + layer

    @property
    def image_tokens(self) -> int:
        """Features per image: 576 patches for ViT-L/14 at 336 px (577 with the CLS token, strategy "full")."""
        return self.vision_config.num_patches + (self.vision_feature_select_strategy == "full")

    @classmethod
    def from_json(cls, path) -> "LlavaConfig":
        """Read llava-hf's `config.json` (either transformers' spelling); other LLaVA variants are named and refused."""
        raw = read_config_json(path)
        model_type = raw.get("model_type")
        if model_type in OTHER_VARIANTS:
            raise UsageError(f"{path}: {unsupported_variant(model_type)}")
        if model_type != "llava":
            raise UsageError(f"{path} describes a {model_type!r} model, not LLaVA")
        if "mm_vision_tower" in raw:
            raise UsageError(f"{path}: {ORIGINAL_LLAVA}")
        if "image_grid_pinpoints" in raw:
            raise UsageError(f"{path} has image_grid_pinpoints: LLaVA-NeXT's anyres tiling is not supported")
        if not isinstance(raw.get("vision_feature_layer", -2), int):
            raise UsageError(f"{path}: vision_feature_layer {raw['vision_feature_layer']} (several layers) "
                             "is not supported, only one layer")
        for name in ("vision_config", "text_config"):
            if not isinstance(raw.get(name), dict):
                raise UsageError(f"{path} has no {name}")
        known = {f.name for f in fields(cls)} - {"vision_config", "text_config"}
        kw = {k: v for k, v in raw.items() if k in known}
        if "image_token_id" in raw:  # transformers' other spelling of image_token_index
            kw.setdefault("image_token_index", raw["image_token_id"])
        text_config = llama_model.LlamaConfig.from_dict({**LLAMA_CONFIG_DEFAULTS, **raw["text_config"]}, path)
        config = cls(vision_config=CLIPVisionConfig.from_dict(raw["vision_config"]), text_config=text_config, **kw)
        if raw.get("image_seq_length", config.image_tokens) != config.image_tokens:
            raise UsageError(f"{path}: image_seq_length {raw['image_seq_length']} but the vision tower gives "
                             f"{config.image_tokens} features per image")
        return config


class LlavaForConditionalGeneration(nn.Module):
    """CLIP vision tower + projector + the LLaMA language model; module names are the hub checkpoint's."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(
            config.vision_config.hidden_size, config.text_config.hidden_size, config.projector_hidden_act,
            config.multimodal_projector_bias)
        self.language_model = llama_model.LlamaForCausalLM(config.text_config)

    def image_features(self, pixel_values: torch.Tensor, vision_block=None) -> torch.Tensor:
        """Pixel values (N, 3, 336, 336) -> each image's features in the language model's space (N, 576, hidden).

        `vision_block(layer, x)`: how to run each vision layer (default: dense); mumoe.routed_block routes
        each image on itself.
        """
        x = self.vision_tower.hidden_states(pixel_values, self.config.feature_layers, vision_block)
        if self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]  # the CLS token is dropped: the 576 patch tokens remain
        return self.multi_modal_projector(x)

    def embed_prompt(self, ids, pixel_values: torch.Tensor | None = None, vision_block=None) -> torch.Tensor:
        """A prompt's token ids (a list, or (T,) / (1, T)), one `image_token_index` where each image goes, and its
        images' pixel values (N, 3, H, W), or (3, H, W) for one -> the embedded prompt (1, T', hidden) that the
        language model runs on: each image token replaced by that image's features (576 rows), in order."""
        device = self.multi_modal_projector.linear_1.weight.device
        ids = torch.as_tensor(ids, device=device).flatten()  # (T,)
        is_image = ids == self.config.image_token_index
        n_images = 0 if pixel_values is None else (1 if pixel_values.ndim == 3 else pixel_values.shape[0])
        if is_image.sum().item() != n_images:
            raise UsageError(f"the prompt has {is_image.sum().item()} image tokens for {n_images} images")
        # (1, T, hidden): the image tokens are looked up as id 0, and their rows replaced below
        text = self.language_model.embed(ids.masked_fill(is_image, 0)[None])
        if n_images == 0:
            return text
        features = self.image_features(pixel_values.reshape(n_images, *pixel_values.shape[-3:]).to(device),
                                       vision_block).to(text.dtype)  # (N, 576, hidden)
        pieces, start = [], 0
        for position, image in zip(is_image.nonzero().flatten().tolist(), features):
            pieces += [text[:, start:position], image[None]]  # the text before the image, then the image
            start = position + 1
        pieces.append(text[:, start:])
        return torch.cat(pieces, dim=1)  # (1, T - N + N * 576, hidden)

    def vision_encoder(self) -> "CLIPFeatureEncoder":
        """The vision layers that make the features, as the method files see a model (count_macs, prune_model)."""
        return CLIPFeatureEncoder(self.vision_tower, self.config.feature_layers)

    def forward(self, ids, pixel_values: torch.Tensor | None = None, linear: LinearFn = dense_linear) -> torch.Tensor:
        """One prompt -> logits (1, T', vocab) at every position of the embedded prompt (images included)."""
        x = self.embed_prompt(ids, pixel_values)
        for block in self.language_model.blocks:
            x = block(x, linear)
        return self.language_model.head(x)


FAMILY, CONFIG_CLASS, MODEL_CLASS = "llava", LlavaConfig, LlavaForConditionalGeneration  # for models.py
read_config = LlavaConfig.from_json

# A checkpoint key's prefix -> our module name for it. llava-hf's hub files are written by transformers < 4.52
# (our names); 4.52 and later keep `model.` in front and the lm_head outside it; transformers 5 flattens
# CLIPVisionModel (no `vision_model.`). Longer prefixes come first.
CHECKPOINT_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# an old CLIP buffer (arange) that some checkpoints store: we compute positions ourselves
POSITION_IDS = "vision_tower.vision_model.embeddings.position_ids"


def our_name(key: str) -> str | None:
    """A checkpoint key (either layout) -> our module's name; None for a buffer we compute ourselves."""
    for prefix, ours in CHECKPOINT_PREFIXES:
        if key.startswith(prefix):
            key = ours + key[len(prefix):]
            break
    if key == POSITION_IDS:
        return None
    if key.startswith("language_model."):  # the language model's own keys, e.g. a stored rotary inv_freq
        inner = llama_model.checkpoint_name(key[len("language_model."):])
        return None if inner is None else "language_model." + inner
    return key


def load_llava(name_or_path, device="cpu", dtype=torch.float32) -> LlavaForConditionalGeneration:
    """Build LLaVA from a checkpoint, strictly: every key used, none missing, every shape checked."""
    if str(name_or_path).startswith("liuhaotian/"):  # refused by name, before anything is downloaded
        raise UsageError(ORIGINAL_LLAVA)
    device = check_device(device)
    check_dtype(dtype)
    directory = resolve_checkpoint(str(name_or_path))
    config = LlavaConfig.from_json(directory / "config.json")
    with empty_modules():
        model = LlavaForConditionalGeneration(config)
    tied = ({"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}
            if config.text_config.tie_word_embeddings else {})
    load_weights(model, directory, our_name, device, dtype, tied)
    return model.to(device)  # the rotary frequencies, computed on the CPU, join the weights


load_model = load_llava  # the name models.py calls every family's loader by


def load_tokenizer(name_or_path):
    """The language model's tokenizer (llava-hf ships Llama's, with `<image>` added as id 32000)."""
    return llama_model.load_tokenizer(name_or_path)
