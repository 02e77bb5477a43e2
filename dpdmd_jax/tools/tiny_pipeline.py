r"""A tiny random `StableDiffusion3Pipeline` (or `StableDiffusionXLPipeline`) folder, built offline
(no hub): tokenizers from a small vocabulary written here, random CLIP-L / bigG / T5 /
transformer (or UNet) / VAE of a few thousand parameters each. It exercises every code path of the
real pipeline in seconds; the tests train on it, and a user can try the configs end to end with it:

  python -m dpdmd_jax.tools.tiny_pipeline /tmp/tiny_sd3            # or: /tmp/tiny_sdxl --family=sdxl
  python -m dpdmd_jax.main --config=configs/sd35.py:tiny --workdir=/tmp/run \
      --config.model.source=/tmp/tiny_sd3 --config.data.prompt_file=prompts.txt

Needs torch, diffusers and transformers (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import string
from collections.abc import Sequence

WORDS = ("the", "a", "and", "of", "cat", "dog", "on", "in", "sea", "red", "blue", "house", "photo", "night")
CLIP_HIDDEN = (16, 16)  # CLIP-L, bigG: their sum must not exceed T5's d_model (the pipeline pads to it)
T5_D_MODEL = 32
PROJECTION = 8
LATENT_CHANNELS = 16


def write_clip_vocab(folder: str) -> None:
    """A byte-level BPE vocabulary (vocab.json + merges.txt) in CLIP's format: "!" is id 0 (bigG's
    pad), the end-of-text token is the largest id (CLIP-L's legacy pooling takes argmax(ids))."""
    chars = list(string.ascii_lowercase + string.digits + ".,'!-")
    tokens = ["!"] + [c for c in chars if c != "!"] + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:  # merge each word left to right, so common words are one token
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in tokens:
                tokens.append(parts[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")


def clip_tokenizer(folder: str, pad_token: str):
    from transformers import CLIPTokenizer

    write_clip_vocab(folder)
    # model_max_length 77: the pipeline takes its CLIP length from it (the default 1e30 overflows)
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=77, pad_token=pad_token)


def t5_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + ".,'!-"]
    pieces += [("▁" + w, -1.0) for w in WORDS]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                         special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _perturb(module, seed: int, scale: float = 0.05):
    """Random init plus noise on every parameter, so zero / one initialised ones are exercised."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def build_pipeline(work: str, seed: int = 0):
    """The tiny pipeline object (tokenizer files go under `work`)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok_l = clip_tokenizer(os.path.join(work, "clip_vocab_l"), pad_token="<|endoftext|>")
    tok_g = clip_tokenizer(os.path.join(work, "clip_vocab_g"), pad_token="!")
    tok_t5 = t5_tokenizer()

    text_encoder, text_encoder_2 = tiny_clips(tok_l, with_projection_l=True, seed=seed)
    t5 = _perturb(T5EncoderModel(T5Config(vocab_size=len(tok_t5), d_model=T5_D_MODEL, d_kv=8, d_ff=48, num_layers=2,
                                          num_heads=4, relative_attention_num_buckets=8,
                                          relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                                          is_encoder_decoder=False, use_cache=False)), seed + 3)
    transformer = _perturb(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_D_MODEL, caption_projection_dim=16,
        pooled_projection_dim=2 * PROJECTION, out_channels=LATENT_CHANNELS, pos_embed_max_size=8,
        dual_attention_layers=(0,), qk_norm="rms_norm"), seed + 4)
    vae = tiny_vae(LATENT_CHANNELS, seed + 5, scaling_factor=1.5305, shift_factor=0.0609, quant_convs=False)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tok_l, text_encoder_2=text_encoder_2, tokenizer_2=tok_g,
        text_encoder_3=t5, tokenizer_3=tok_t5)


def tiny_clips(tokenizer, with_projection_l: bool, seed: int):
    """CLIP-L-like (quick_gelu, legacy eos_token_id 2, as SD3 / SDXL ship it) and bigG-like (exact
    gelu, pooling at the real EOS id, with projection) random encoders."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, eos = len(tokenizer), tokenizer.eos_token_id

    def clip(hidden, layers, act, eos_token_id, s, cls=CLIPTextModelWithProjection):
        cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             projection_dim=PROJECTION, num_hidden_layers=layers, num_attention_heads=2,
                             max_position_embeddings=77, hidden_act=act, bos_token_id=vocab - 2,
                             eos_token_id=eos_token_id, pad_token_id=1)
        return _perturb(cls(cfg), s)

    clip_l = clip(CLIP_HIDDEN[0], 2, "quick_gelu", 2, seed + 1,
                  CLIPTextModelWithProjection if with_projection_l else CLIPTextModel)
    return clip_l, clip(CLIP_HIDDEN[1], 3, "gelu", eos, seed + 2)


def tiny_vae(latent_channels: int, seed: int, *, scaling_factor: float, shift_factor: float | None,
             quant_convs: bool):
    from diffusers import AutoencoderKL

    return _perturb(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=quant_convs, use_post_quant_conv=quant_convs), seed, scale=0.02)


def build_sdxl_pipeline(work: str, seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """The tiny SDXL pipeline object (tokenizer files go under `work`)."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tok_l = clip_tokenizer(os.path.join(work, "clip_vocab_l"), pad_token="<|endoftext|>")
    tok_g = clip_tokenizer(os.path.join(work, "clip_vocab_g"), pad_token="!")
    text_encoder, text_encoder_2 = tiny_clips(tok_l, with_projection_l=False, seed=seed)
    # One cross-attention block each way (plus the mid block): every path of the SDXL UNet class
    # the trainer touches, at a fraction of the compile time of SDXL's three levels.
    unet = _perturb(UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        transformer_layers_per_block=1, attention_head_dim=2, cross_attention_dim=sum(CLIP_HIDDEN),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + PROJECTION, norm_num_groups=4), seed + 4)
    vae = tiny_vae(4, seed + 5, scaling_factor=0.13025, shift_factor=None, quant_convs=True)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tok_l, tokenizer_2=tok_g, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it portably is to set it; put it straight back
    os.umask(mask)
    return mask


def respect_umask(folder: str) -> None:
    """Gives every file under `folder` mode 0666 and every folder 0777, less the umask (0644 and
    0755 under the usual 022). safetensors writes each weights file through a private temporary
    file (mode 0600, Rust's `tempfile`) that it renames into place, so `save_pretrained` leaves the
    weights readable by their owner only, unlike the JSON files beside them."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def check_out(out: str) -> str | None:
    """Why `out` cannot receive a pipeline (None when it can: absent, or an empty folder)."""
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        return f"{out} exists and is not a folder; choose a new folder"
    if os.listdir(out):
        return f"{out} exists and is not empty; choose a new folder (pipelines are never written over files)"
    return None


def make_tiny_pipeline(out: str, seed: int = 0, family: str = "sd3", **kw):
    """Writes the tiny pipeline of `family` ("sd3" | "sdxl") to `out` (which must not exist yet,
    or be an empty folder), with ordinary file modes; returns the pipeline object."""
    problem = check_out(out)
    if problem:
        raise FileExistsError(problem)
    os.makedirs(out, exist_ok=True)
    work = os.path.join(out, ".vocab")
    pipe = {"sd3": build_pipeline, "sdxl": build_sdxl_pipeline}[family](work, seed, **kw)
    pipe.save_pretrained(out, safe_serialization=True)
    import shutil

    shutil.rmtree(work)
    respect_umask(out)
    return pipe


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (flags in any order; `--help`); bad input exits with code 2 and one line."""
    parser = argparse.ArgumentParser(prog="python -m dpdmd_jax.tools.tiny_pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", metavar="OUT_DIR", help="the pipeline folder to create (new, or an empty folder)")
    parser.add_argument("--family", choices=("sd3", "sdxl"), default="sd3",
                        help="sd3: a StableDiffusion3Pipeline (configs/sd35.py); sdxl: a StableDiffusionXLPipeline "
                             "(configs/sdxl.py). Default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    args = parser.parse_args(argv)
    problem = check_out(args.out)
    if problem:  # before torch is imported: a wrong folder is said at once
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = make_tiny_pipeline(args.out, seed=args.seed, family=args.family)
    print(f"wrote a tiny random {type(pipe).__name__} to {args.out}")


if __name__ == "__main__":
    main()
