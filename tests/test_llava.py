"""Tests for llava_model: the CLIP vision tower, the projector, preprocessing, the prompt, the whole LLaVA.

References (test-only oracles): transformers' CLIPVisionModel (the vision features), CLIPImageProcessorPil
and LlavaImageProcessorPil (preprocessing), LlavaForConditionalGeneration (logits and greedy generation),
PreTrainedTokenizerFast with LLaVA's tokenizer_image_token restated (the prompt's ids), and, for μ-MoE on
LLaVA, our own pruners.prune_model (block routing of a prompt is Wanda calibrated on that prompt alone).
Tiny random models are built and saved in the Hugging Face layout here, so nothing is downloaded.
"""

import numpy as np
import pytest
import torch

import llava_model
from checkpoint import UsageError
from llava_model import (CLIP_MEAN, CLIP_STD, PAD_COLOR, CLIPVisionConfig, CLIPVisionModel, conversation_prompt,
                         expand_to_square, preprocess)
from mumoe import MuMoE
from kit.checks import assert_close
from kit.commands import run_generate
from kit.tiny_models import (IMAGE_ID, N_FEATURES, TINY_VISION, randomize_layer_norms, rewrite_checkpoint,
                             save_tiny_llava, save_tiny_opt)
from kit.tiny_tokenizers import save_llama2_like_tokenizer


# -----------------------------------------------------------------------------
# The vision tower against transformers' CLIPVisionModel

VISION_ATOL = 1e-5  # fp32; measured max |diff| 0 on these shapes (the same ops), the margin is for other BLAS orders


@pytest.fixture(scope="module")
def clip_pair():
    """(ours, transformers' CLIPVisionModel) with the same random weights."""
    import transformers

    torch.manual_seed(0)
    reference = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_VISION)).eval()
    randomize_layer_norms(reference)
    ours = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    # transformers 5 flattened CLIPVisionModel; the hub checkpoints (and our module names) keep `vision_model.`
    ours.load_state_dict({f"vision_model.{k}": v for k, v in reference.state_dict().items()}, strict=True)
    return ours.eval(), reference


def test_vision_features_equal_clip_hidden_state_minus_2(clip_pair):
    ours, reference = clip_pair
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference(pixels, output_hidden_states=True).hidden_states
        for layers in range(len(ref)):  # every depth, so an off-by-one in the layer count shows
            assert_close(ours.hidden_states(pixels, layers), ref[layers], VISION_ATOL, f"after {layers} layers")
        assert_close(ours.hidden_states(pixels, 2)[:, 1:], ref[-2][:, 1:], VISION_ATOL, "LLaVA's features")


def test_vision_tower_refuses_other_image_sizes(clip_pair):
    ours, _ = clip_pair
    with pytest.raises(UsageError, match="48x48 for a vision tower of 56x56"):
        ours.hidden_states(torch.zeros(1, 3, 48, 48), 1)


# -----------------------------------------------------------------------------
# Preprocessing against transformers' image processors

# Our resize is the same Pillow call on the same 8-bit image, then rescale and normalize in float32: measured
# max |diff| 0 on every image here; the margin is for float64 rescaling (older transformers) and fused ops.
PIXEL_ATOL = 1e-6
SIZE = 336


def random_image(mode, w, h, seed=0):
    from PIL import Image

    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    g = torch.Generator().manual_seed(seed)
    # smooth gradients plus noise: bicubic resampling over- and undershoots, which 8-bit clipping must catch
    x = torch.linspace(0, 255, w).view(1, w, 1) * torch.rand(1, 1, channels, generator=g)
    y = torch.linspace(0, 255, h).view(h, 1, 1) * torch.rand(1, 1, channels, generator=g)
    noise = torch.randint(0, 64, (h, w, channels), generator=g)
    pixels = ((x + y) / 2 + noise).clamp(0, 255).to(torch.uint8)
    if mode == "RGBA":
        pixels[..., 3] = 255  # opaque: see test_rgba_drops_alpha_as_llava_does for transparency
    return Image.fromarray(pixels.squeeze(-1).numpy(), mode)


IMAGES = {  # mode, width, height
    "rgb_wide": ("RGB", 640, 480),
    "rgb_tall": ("RGB", 200, 500),
    "rgba": ("RGBA", 400, 300),
    "grayscale": ("L", 300, 420),
    "small_upscaled": ("RGB", 30, 20),
    "square": ("RGB", 336, 336),
}


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_resize_crop_normalize_equal_clip_image_processor(name):
    from transformers import CLIPImageProcessorPil

    image = random_image(*IMAGES[name])
    processor = CLIPImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    ref = processor(image, return_tensors="pt")["pixel_values"][0]
    ours = preprocess(image, SIZE, aspect_ratio="crop")
    assert ours.shape == ref.shape == (3, SIZE, SIZE)
    assert_close(ours, ref, PIXEL_ATOL, f"{name}: preprocess(crop) vs CLIPImageProcessor")


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_padded_preprocess_equals_llava_image_processor_with_pad(name):
    """transformers' LlavaImageProcessorPil(do_pad=True) pads as LLaVA's expand2square does (its LlavaProcessor
    leaves do_pad off): a second, independent reading of the padding."""
    from transformers import LlavaImageProcessorPil

    image = random_image(*IMAGES[name])
    processor = LlavaImageProcessorPil(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                       do_pad=True)
    ref = processor(image, return_tensors="pt")["pixel_values"][0]
    assert_close(preprocess(image, SIZE), ref, PIXEL_ATOL, f"{name}: preprocess(pad) vs LlavaImageProcessor(do_pad)")


def normalized(color) -> torch.Tensor:
    return (torch.tensor(color) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


@pytest.mark.parametrize("w, h", [(100, 40), (40, 100), (101, 40), (40, 41)])
def test_padding_centers_the_image_on_the_mean_color(w, h):
    from PIL import Image

    red = (250, 10, 20)
    square = expand_to_square(Image.new("RGB", (w, h), red))
    side = max(w, h)
    assert square.size == (side, side)
    grid = torch.from_numpy(np.asarray(square).copy())  # (row, column, channel)
    is_red = (grid == torch.tensor(red)).all(-1)
    is_pad = (grid == torch.tensor(PAD_COLOR)).all(-1)
    assert PAD_COLOR == (122, 116, 104)
    assert (is_red | is_pad).all()
    rows, cols = is_red.any(1).nonzero().flatten(), is_red.any(0).nonzero().flatten()
    top, left = rows[0].item(), cols[0].item()
    assert (len(rows), len(cols)) == (h, w)
    assert (top, left) == ((side - h) // 2, (side - w) // 2), "the image is centered, the offset rounded down"
    bottom, right = side - 1 - rows[-1].item(), side - 1 - cols[-1].item()
    assert abs(top - bottom) <= 1 and abs(left - right) <= 1

    pixels = preprocess(Image.new("RGB", (w, h), red), 56)  # the whole pipeline, at a small size
    assert_close(pixels[:, 28, 28], normalized(red), 1e-5, "the image's color in the middle")
    if abs(w - h) > 1:  # a band of padding wide enough to survive the resize, at the left or the top
        band = pixels[:, 28, 0] if w < h else pixels[:, 0, 28]
        assert_close(band, normalized(PAD_COLOR), 1e-5, "the mean color beside the image")


def test_rgba_drops_alpha_as_llava_does():
    """LLaVA opens images with Pillow's convert("RGB"): a transparent pixel keeps its RGB values (transformers 5
    would composite it over white)."""
    from PIL import Image

    image = Image.new("RGBA", (8, 8), (10, 200, 30, 0))  # fully transparent
    pixels = preprocess(image, 14)
    assert_close(pixels[:, 7, 7], normalized((10, 200, 30)), 1e-5, "a transparent pixel's color")


def test_load_image_errors(tmp_path):
    from PIL import Image

    (tmp_path / "not_an_image.jpg").write_text("hello")
    with pytest.raises(UsageError, match="could not be opened"):
        llava_model.load_image(tmp_path / "not_an_image.jpg")
    with pytest.raises(UsageError, match="not found"):
        llava_model.load_image(tmp_path / "missing.png")
    Image.new("L", (5, 3), 7).save(tmp_path / "gray.png")
    image = llava_model.load_image(tmp_path / "gray.png")
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (7, 7, 7)


def test_unknown_aspect_ratio_is_refused():
    from PIL import Image

    with pytest.raises(UsageError, match="image_aspect_ratio 'anyres' is not supported"):
        preprocess(Image.new("RGB", (4, 4)), aspect_ratio="anyres")


# -----------------------------------------------------------------------------
# The prompt


def test_conversation_prompt_is_vicuna_v1():
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert conversation_prompt("What is it?", has_image=True) == f"{system} USER: <image>\nWhat is it? ASSISTANT:"
    assert conversation_prompt("What is it?", has_image=False) == f"{system} USER: What is it? ASSISTANT:"
    assert conversation_prompt("Look: <image> here", has_image=True) == f"{system} USER: Look: <image> here ASSISTANT:"


# -----------------------------------------------------------------------------
# The whole LLaVA against transformers' LlavaForConditionalGeneration

LOGITS_ATOL = 1e-5  # fp32 logits of two implementations of the same arithmetic: measured max |diff| ~1e-6


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llava")
    reference = save_tiny_llava(directory)
    return directory, reference, llava_model.load_llava(directory)


def random_pixels(n=1, seed=2):
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def expanded(ids):
    """transformers' input ids: each image token repeated once per feature, as its LlavaProcessor writes them."""
    out = []
    for i in ids:
        out += [i] * (N_FEATURES if i == IMAGE_ID else 1)
    return torch.tensor([out])


PROMPT_WITH_IMAGE = [1, 5, 17, 9, IMAGE_ID, 33, 41, 7, 12, 60]


def test_logits_with_an_image_equal_transformers(tiny_llava):
    _, reference, model = tiny_llava
    pixels = random_pixels()
    with torch.no_grad():
        ref = reference(input_ids=expanded(PROMPT_WITH_IMAGE), pixel_values=pixels).logits
        ours = model(PROMPT_WITH_IMAGE, pixels)
    assert ours.shape == ref.shape == (1, len(PROMPT_WITH_IMAGE) - 1 + N_FEATURES, 128)
    assert_close(ours, ref, LOGITS_ATOL, "logits with an image vs LlavaForConditionalGeneration")


def test_text_only_logits_equal_transformers(tiny_llava):
    _, reference, model = tiny_llava
    ids = [1, 8, 3, 99, 4, 27]
    with torch.no_grad():
        assert_close(model(ids), reference(input_ids=torch.tensor([ids])).logits, LOGITS_ATOL, "text-only logits")


def test_image_features_equal_transformers(tiny_llava):
    _, reference, model = tiny_llava
    pixels = random_pixels(2)
    with torch.no_grad():
        ref = reference.model.get_image_features(pixel_values=pixels).pooler_output  # a list, one per image
        assert_close(model.image_features(pixels), torch.stack(ref), LOGITS_ATOL, "projected image features")


def test_greedy_generation_equals_transformers(tiny_llava):
    import mumoe

    _, reference, model = tiny_llava
    pixels, steps = random_pixels(), 12
    with torch.no_grad():
        hf = reference.generate(input_ids=expanded(PROMPT_WITH_IMAGE), pixel_values=pixels, max_new_tokens=steps,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = mumoe.generate(model.language_model, model.embed_prompt(PROMPT_WITH_IMAGE, pixels), steps)
    assert ours == hf[0, expanded(PROMPT_WITH_IMAGE).shape[1]:].tolist()
    assert len(set(ours)) > 2, "a sequence that varies, so that a wrong position or cache shows"


# -----------------------------------------------------------------------------
# Checkpoint layouts and variants

def hub_legacy_key(key):
    """transformers 5's save_pretrained key -> llava-hf's hub files (transformers < 4.52)."""
    return key.replace("vision_tower.", "vision_tower.vision_model.", 1) if key.startswith("vision_tower.") else key


def transformers_4_52_key(key):
    """-> transformers 4.52 .. 4.57's layout: everything under model., lm_head outside, CLIP not flattened."""
    key = hub_legacy_key(key)
    if key.startswith("language_model.lm_head."):
        return key.removeprefix("language_model.")
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    return "model." + key


LAYOUTS = {
    "hub_legacy": hub_legacy_key,
    "transformers_4_52": transformers_4_52_key,
    "transformers_5_in_memory": lambda key: transformers_4_52_key(key).replace(".vision_model.", ".", 1),
}


def renamed(rename):
    """A checkpoint edit (kit.tiny_models.rewrite_checkpoint) that renames every key."""
    return lambda state: {rename(k): v for k, v in state.items()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_layouts_load_to_the_same_model(tiny_llava, tmp_path, layout):
    directory, _, model = tiny_llava
    other = llava_model.load_llava(rewrite_checkpoint(directory, tmp_path / layout, renamed(LAYOUTS[layout])))
    theirs, ours = other.state_dict(), model.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours), f"{layout} loads other tensors"


def test_hub_legacy_layout_is_what_transformers_reads(tiny_llava, tmp_path):
    """The legacy names are not our invention: transformers maps them onto the same model."""
    import transformers

    directory, reference, _ = tiny_llava
    legacy = rewrite_checkpoint(directory, tmp_path / "legacy", renamed(hub_legacy_key))
    again = transformers.LlavaForConditionalGeneration.from_pretrained(legacy).eval()
    theirs = again.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in reference.state_dict().items())


def test_stored_clip_position_ids_are_accepted(tiny_llava, tmp_path):
    directory, _, model = tiny_llava
    arange = torch.arange(N_FEATURES + 1)[None]
    stored = rewrite_checkpoint(directory, tmp_path / "ids",
                                lambda state: {**state, "vision_tower.embeddings.position_ids": arange})
    assert torch.equal(llava_model.load_llava(stored).state_dict()["multi_modal_projector.linear_1.weight"],
                       model.state_dict()["multi_modal_projector.linear_1.weight"])


@pytest.mark.parametrize("drop, message", [
    ("multi_modal_projector.linear_2.bias", "lacks 'multi_modal_projector.linear_2.bias'"),
    ("vision_tower.post_layernorm.weight", "lacks 'vision_tower.vision_model.post_layernorm.weight'"),
    ("language_model.lm_head.weight", "lacks 'language_model.lm_head.weight'"),
])
def test_missing_key_is_refused(tiny_llava, tmp_path, drop, message):
    directory, _, _ = tiny_llava
    with pytest.raises(UsageError, match=message):
        llava_model.load_llava(rewrite_checkpoint(directory, tmp_path / "missing",
                                                        lambda state: {k: v for k, v in state.items() if k != drop}))


def test_unexpected_key_is_refused(tiny_llava, tmp_path):
    directory, _, _ = tiny_llava
    extra = rewrite_checkpoint(directory, tmp_path / "extra", lambda state: {**state, "image_newline": torch.zeros(32)})
    with pytest.raises(UsageError, match="unexpected key 'image_newline'"):
        llava_model.load_llava(extra)


def edited_config(directory, tmp_path, edit):
    import json
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(directory, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llava_next"), r"LLaVA-NeXT \(LLaVA-1.6, anyres tiling\) .* is not supported"),
    (lambda c: c.update(image_grid_pinpoints=[[336, 672]]), "anyres tiling is not supported"),
    (lambda c: c.update(image_aspect_ratio="anyres"), "image_aspect_ratio 'anyres' is not supported"),
    (lambda c: c.update(mm_vision_tower="openai/clip-vit-large-patch14-336"), "original liuhaotian"),
    (lambda c: c.update(model_type="llava_llama"), "original liuhaotian"),
    (lambda c: c.update(vision_feature_layer=[-2, -5]), "several layers"),
    (lambda c: c.update(vision_feature_select_strategy="cls"), "vision_feature_select_strategy 'cls'"),
    (lambda c: c["vision_config"].update(model_type="siglip_vision_model"), "only CLIP's"),
    (lambda c: c.update(image_seq_length=576), "image_seq_length 576 but the vision tower gives 16"),
])
def test_other_variants_are_refused_by_name(tiny_llava, tmp_path, edit, message):
    directory, _, _ = tiny_llava
    with pytest.raises(UsageError, match=message):
        llava_model.load_llava(edited_config(directory, tmp_path, edit))


def test_original_llava_is_refused_before_any_download():
    with pytest.raises(UsageError, match="llava-hf/llava-1.5-7b-hf"):
        llava_model.load_llava("liuhaotian/llava-v1.5-7b")


# llava-hf/llava-1.5-7b-hf's config.json (transformers 4.36's diff against each sub-config's defaults)
LLAVA_15_7B_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


def test_llava_15_7b_config_gives_the_7b_model(tmp_path):
    """The hub's config leaves out what equals transformers' defaults: read as transformers reads it, it is
    Vicuna-7B + CLIP ViT-L/14-336, 7,063,427,072 parameters (the hub's model card: 7.06B)."""
    import json

    import transformers

    (tmp_path / "config.json").write_text(json.dumps(LLAVA_15_7B_CONFIG))
    config = llava_model.LlavaConfig.from_json(tmp_path / "config.json")
    assert config.vision_config == llava_model.CLIP_VIT_L_336
    text = config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size, text.max_position_embeddings, text.rms_norm_eps,
            text.eos_token_id) == (4096, 11008, 32, 32, 32, 32064, 4096, 1e-5, 2)
    assert (config.image_token_index, config.feature_layers, config.image_tokens) == (32000, 23, 576)
    with torch.device("meta"):
        ours = llava_model.LlavaForConditionalGeneration(config)
        theirs = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**LLAVA_15_7B_CONFIG))
    count = lambda m: sum(p.numel() for p in m.state_dict().values())
    assert count(ours) == count(theirs) == 7_063_427_072


# -----------------------------------------------------------------------------
# Tokenizing the prompt as LLaVA does


def llava_tokenizer_image_token(hf_tokenizer, prompt, image_id):
    """LLaVA's tokenizer_image_token, restated: each chunk between placeholders tokenized with BOS; if the
    first starts with BOS, BOS is kept once in front and the first token of every chunk is dropped."""
    chunks = [hf_tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == hf_tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    separated = [x for chunk in chunks for x in (chunk, [image_id] * (offset + 1))][:-1]
    for x in separated:
        ids.extend(x[offset:])
    return ids


@pytest.fixture(scope="module")
def tokenizers_pair(tmp_path_factory):
    """(ours, transformers' fast tokenizer on the same file, the image token's id)"""
    import llama_model
    import transformers

    directory = tmp_path_factory.mktemp("llama2_tokenizer")
    image_id = save_llama2_like_tokenizer(directory)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), bos_token="<s>")
    return llama_model.load_tokenizer(directory), theirs, image_id


@pytest.mark.parametrize("message, has_image", [
    ("What is in the picture?", True),
    ("What is in the picture?", False),
    ("Compare <image> with <image>:", True),  # two images, text between and after
    ("<image>", True),  # nothing after the image but the assistant's turn
])
def test_prompt_ids_equal_llavas_procedure(tokenizers_pair, message, has_image):
    ours, theirs, image_id = tokenizers_pair
    prompt = conversation_prompt(message, has_image)
    ids = llava_model.prompt_ids(ours, prompt, image_id)
    assert ids == llava_tokenizer_image_token(theirs, prompt, image_id)
    assert ids[0] == 1 and ids.count(1) == 1, "one BOS, at the start"
    assert ids.count(image_id) == prompt.count("<image>")
    if has_image:
        first = theirs(prompt.split("<image>")[0]).input_ids  # BOS + the system text and "USER: "
        assert ids.index(image_id) == len(first), "the image sits right after the text before it"


def test_text_after_an_image_starts_as_a_fresh_text(tokenizers_pair):
    """As with Llama's sentencepiece: the piece after the image begins with "▁", then the newline's byte."""
    ours, theirs, image_id = tokenizers_pair
    ids = llava_model.prompt_ids(ours, conversation_prompt("What is it?", True), image_id)
    after = ids[ids.index(image_id) + 1:]
    assert theirs.convert_ids_to_tokens(after[:2]) == ["▁", "<0x0A>"]


# -----------------------------------------------------------------------------
# μ-MoE on LLaVA: the method files get the language model's blocks and the embedded prompt

ROUTING_ATOL = 1e-5  # routed vs. a model pruned by prune_model: the same masks, products in another order


def embedded_prompts(model, n, seed=5):
    """n prompts of equal length, each with its own image and its own text: (1, T, hidden) each."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        ids = torch.randint(3, 90, (12,), generator=g).tolist()
        ids[1 + i] = IMAGE_ID  # the image at another place in each
        prompts.append(model.embed_prompt([1] + ids, random_pixels(seed=seed + i)))
    return prompts


@pytest.mark.parametrize("rho, nm", [(0.5, None), (0.3, None), (1.0, (2, 4))])
def test_block_routing_of_a_prompt_is_wanda_calibrated_on_it(tiny_llava, rho, nm):
    """The identity that holds for OPT and LLaMA, on a prompt with its image features (N:M too)."""
    import copy

    from mumoe import mumoe_logits
    from pruners import prune_model

    _, _, model = tiny_llava
    x = embedded_prompts(model, 1)[0]
    pruned = copy.deepcopy(model.language_model)
    prune_model(pruned, [x], "wanda", rho, nm=nm, progress=False)
    expected = mumoe_logits(pruned, x, MuMoE(1.0))  # the pruned model, dense, on the same prompt
    routed = mumoe_logits(model.language_model, x, MuMoE(rho, routing="block", nm=nm))
    assert_close(routed, expected, ROUTING_ATOL, f"block routing vs prune_model on the prompt, rho={rho}, nm={nm}")
    assert (routed - model.language_model.head(x)).abs().max() > 1e-3, "the routing changed nothing"


@pytest.mark.parametrize("routing", ["block", "linear"])
def test_prompts_in_a_batch_are_routed_independently(tiny_llava, routing):
    from mumoe import mumoe_logits

    _, _, model = tiny_llava
    prompts = embedded_prompts(model, 3)
    batched = mumoe_logits(model.language_model, torch.cat(prompts), MuMoE(0.5, routing=routing))
    for b, x in enumerate(prompts):
        assert_close(batched[b], mumoe_logits(model.language_model, x, MuMoE(0.5, routing=routing))[0], ROUTING_ATOL,
                     f"prompt {b} batched vs alone ({routing})")


@pytest.mark.parametrize("routing", ["block", "linear"])
def test_rho_one_is_dense(tiny_llava, routing):
    from mumoe import mumoe_logits, routed_block

    _, _, model = tiny_llava
    ids, pixels = PROMPT_WITH_IMAGE, random_pixels()
    dense = model(ids, pixels)
    embedded = model.embed_prompt(ids, pixels)
    assert torch.equal(mumoe_logits(model.language_model, embedded, MuMoE(1.0, routing=routing)), dense)
    routed_vision = model.embed_prompt(ids, pixels, vision_block=routed_block(MuMoE(1.0, routing=routing)))
    assert torch.equal(routed_vision, model.embed_prompt(ids, pixels)), "rho = 1 routes the vision tower densely"


def test_generation_routes_once_on_the_embedded_prompt(tiny_llava):
    """μ-MoE generation on a LLaVA prompt: each new token is what the routed forward over the prompt and the
    tokens so far picks, routed on the prompt only (prefix = its length)."""
    from mumoe import generate, mumoe_logits

    _, _, model = tiny_llava
    lm, x = model.language_model, model.embed_prompt(PROMPT_WITH_IMAGE, random_pixels())
    new = generate(lm, x, 6, MuMoE(0.5))
    for step in range(6):
        so_far = torch.cat([x, lm.embed(torch.tensor([new[:step]], dtype=torch.long))], dim=1)
        logits = mumoe_logits(lm, so_far, MuMoE(0.5, prefix=x.shape[1]))
        assert logits[0, -1].argmax().item() == new[step], f"token {step}"
    assert new != generate(lm, x, 6), "the dense model continues differently"


@pytest.mark.parametrize("rho", [0.5])
def test_vision_routing_of_an_image_is_wanda_calibrated_on_it(tiny_llava, rho):
    """--route-vision: each image routed on itself in the vision layers the features need, the same identity."""
    import copy

    from mumoe import routed_block
    from pruners import prune_model

    _, _, model = tiny_llava
    pixels = random_pixels(seed=9)
    pruned = copy.deepcopy(model)
    report = prune_model(pruned.vision_encoder(), [model.vision_tower.hidden_states(pixels, 0)], "wanda", rho,
                         progress=False)
    assert len(report) == 6 * model.config.feature_layers and all(k.startswith("layers.") for k in report)
    routed = model.image_features(pixels, vision_block=routed_block(MuMoE(rho, routing="block")))
    assert_close(routed, pruned.image_features(pixels), ROUTING_ATOL, "vision routing vs prune_model on the image")
    assert (routed - model.image_features(pixels)).abs().max() > 1e-3, "the routing changed nothing"


def test_vision_mac_count_is_what_the_routed_pass_does(tiny_llava):
    """count_macs on vision_encoder() counts the layers the features need, each Linear at 17 tokens (16 patches
    and CLS), as many MACs with nonzero weights as the routed pass does."""
    from collections import Counter

    from mumoe import count_macs, routed_block

    _, _, model = tiny_llava
    encoder, counter = model.vision_encoder(), Counter()
    model.image_features(random_pixels(), vision_block=routed_block(MuMoE(0.5, routing="block"), counter=counter))
    names = {layer: f"{encoder.blocks_key}.{i}.{name}"
             for i, block in enumerate(encoder.blocks) for name, layer in block.linears().items()}
    macs = count_macs(encoder, N_FEATURES + 1, MuMoE(0.5))
    assert len(encoder.blocks) == TINY_VISION["num_hidden_layers"] - 1, "layer -2: all but the last"
    assert {names[layer]: n for layer, n in counter.items()} == macs.linear


def test_embed_prompt_refuses_a_mismatch(tiny_llava):
    _, _, model = tiny_llava
    with pytest.raises(UsageError, match="1 image tokens for 0 images"):
        model.embed_prompt(PROMPT_WITH_IMAGE, None)
    with pytest.raises(UsageError, match="1 image tokens for 2 images"):
        model.embed_prompt(PROMPT_WITH_IMAGE, random_pixels(2))
    with pytest.raises(UsageError, match="0 image tokens for 1 images"):
        model.embed_prompt([1, 2, 3], random_pixels())
    two = PROMPT_WITH_IMAGE + [IMAGE_ID, 5]
    x = model.embed_prompt(two, random_pixels(2))
    assert x.shape == (1, len(two) - 2 + 2 * N_FEATURES, 32)
    assert torch.equal(x[0, 4:4 + N_FEATURES], model.image_features(random_pixels(2))[0]), "the first image first"
    assert torch.equal(x[0, -1 - N_FEATURES:-1], model.image_features(random_pixels(2))[1])


# -----------------------------------------------------------------------------
# The generation command on a LLaVA

@pytest.fixture(scope="module")
def llava_with_tokenizer(tmp_path_factory):
    """A tiny LLaVA whose directory holds a Llama-2-like tokenizer, "<image>" at the model's image_token_index."""
    directory = tmp_path_factory.mktemp("llava_with_tokenizer")
    image_id = save_llama2_like_tokenizer(directory)
    save_tiny_llava(directory, vocab_size=image_id + 1, image_token_index=image_id)
    return directory


@pytest.fixture(scope="module")
def cat_jpg(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "cat.jpg"
    random_image("RGB", 90, 60).save(path)
    return path


def test_generation_command_on_a_llava(llava_with_tokenizer, cat_jpg, capsys):
    argv = ["--model", str(llava_with_tokenizer), "--image", str(cat_jpg), "--prompt", "What is in the picture?",
            "--rho", "0.5", "--max-new-tokens", "4", "--device", "cpu"]
    code, out, err = run_generate(argv, capsys)
    assert code == 0, err
    assert f"{N_FEATURES} per image" in out and "USER: <image>\nWhat is in the picture? ASSISTANT:" in out
    assert "--- dense:" in out and "--- μ-MoE, rho = 0.5" in out
    assert "dense in both (--route-vision routes it)" in out
    code, out, err = run_generate(argv + ["--route-vision"], capsys)
    assert code == 0, err
    vision = [line for line in out.splitlines() if "vision tower (2 layers, 17 tokens)" in line]
    assert len(vision) == 1 and "(--route-vision)" in vision[0], out


def test_generation_command_without_an_image(llava_with_tokenizer, capsys):
    code, out, err = run_generate(["--model", str(llava_with_tokenizer), "--prompt", "Describe a cat.", "--rho", "0.5",
                                "--max-new-tokens", "3", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "USER: Describe a cat. ASSISTANT:" in out and "vision tower" not in out


@pytest.mark.parametrize("extra, message", [
    (["--image", "{missing}"], "not found"),
    (["--image", "{text_file}"], "could not be opened"),
    (["--image", "{cat}", "--image", "{cat}"], "give one <image> in the prompt per image"),
    (["--image", "{cat}", "--prompt", "<image> and <image>?"], "2 <image> placeholders for 1 images"),
    (["--prompt", "What is <image>?"], "1 <image> placeholders for 0 images"),
    (["--route-vision"], "--route-vision routes the vision tower on the --image it encodes"),
])
def test_generation_command_bad_input(llava_with_tokenizer, cat_jpg, tmp_path, capsys, extra, message):
    (tmp_path / "notes.jpg").write_text("not an image")
    paths = dict(missing=tmp_path / "missing.png", text_file=tmp_path / "notes.jpg", cat=cat_jpg)
    argv = ["--model", str(llava_with_tokenizer), "--prompt", "What is it?", "--rho", "0.5", "--device", "cpu"]
    code, out, err = run_generate(argv + [arg.format(**paths) for arg in extra], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_models_dispatches_llava_and_names_other_variants(tiny_llava, tmp_path):
    import models

    directory, _, model = tiny_llava
    loaded = models.load_model(directory)
    assert isinstance(loaded, llava_model.LlavaForConditionalGeneration)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(UsageError, match=r"LLaVA-OneVision \(model_type 'llava_onevision'\) is not supported"):
        models.load_model(edited_config(directory, tmp_path, lambda c: c.update(model_type="llava_onevision")))
    with pytest.raises(UsageError, match="liuhaotian"):
        models.load_model("liuhaotian/llava-v1.5-13b")


def test_image_given_to_a_text_model_is_refused(cat_jpg, tmp_path, capsys):
    save_tiny_opt(tmp_path)
    code, _, err = run_generate(["--model", str(tmp_path), "--image", str(cat_jpg), "--prompt", "Hi", "--rho", "0.5"],
                             capsys)
    assert code == 2 and "--image and --route-vision need a vision-language model (LLaVA)" in err, err


@pytest.mark.cuda
def test_loads_in_bfloat16_and_runs(tiny_llava):
    directory, _, model = tiny_llava
    half = llava_model.load_llava(directory, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    pixels = random_pixels()  # float32 pixels: the tower casts them to its own dtype
    logits = half(PROMPT_WITH_IMAGE, pixels)
    assert logits.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: measured max |diff| 0.006 on logits of size ~0.5
    assert_close(logits, model(PROMPT_WITH_IMAGE, pixels), 0.1, "bfloat16 vs float32 logits")
