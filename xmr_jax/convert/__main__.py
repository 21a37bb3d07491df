"""Convert a CLIP checkpoint to xmr_jax params.

    python -m xmr_jax.convert --input ViT-B-16.pt --output ckpt/clip_b16_384x128 --image_size 384,128
    python -m xmr_jax.convert --input hf_clip_folder --output out --format orbax

Writes OUT/xmr_clip.json (model fields) and OUT/params.msgpack (or OUT/checkpoints/0/ for orbax); read back
with `xmr_jax.convert.load_clip(OUT)`.
"""

from __future__ import annotations

import argparse
import sys


def _parse_size(text: str):
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image_size: expected H,W or S, got {text!r}") from None
    if len(parts) == 1:
        return (parts[0], parts[0])
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"--image_size: expected H,W or S, got {text!r}")
    return tuple(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmr_jax.convert", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True,
                        help="OpenAI or open_clip .pt/.pth/.bin/.safetensors, HF CLIPModel or open_clip folder, "
                             "or converted folder")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--image_size", type=_parse_size, default=None,
                        help="H,W to resize the positional embedding to")
    parser.add_argument("--format", choices=("msgpack", "orbax"), default="msgpack")
    parser.add_argument("--vision_heads", type=int, default=None, help="default: from config or width // 64")
    parser.add_argument("--text_heads", type=int, default=None, help="default: from config or width // 64")
    parser.add_argument("--activation", choices=("quick_gelu", "gelu"), default=None,
                        help="MLP activation of a state dict, which does not record it: 'gelu' for open_clip's own "
                             "models (ViT-B-16, ViT-L-14 laion2b / DataComp), 'quick_gelu' for OpenAI's "
                             "(default for OpenAI-layout files); HF / open_clip configs give it themselves")
    parser.add_argument("--source_image_size", type=_parse_size, default=None,
                        help="H,W the checkpoint was trained at, for non-square grids (e.g. IRRA 384,128)")
    args = parser.parse_args(argv)

    from xmr_jax.convert import load_clip, save_converted

    overrides = {k: v for k, v in (("vision_heads", args.vision_heads), ("text_heads", args.text_heads),
                                   ("source_image_size", args.source_image_size),
                                   ("activation", args.activation)) if v}
    try:
        model, params = load_clip(args.input, image_size=args.image_size, **overrides)
        save_converted(model, params, args.output, fmt=args.format)
    except (ValueError, OSError, ImportError) as e:  # OSError: FileNotFoundError, FileExistsError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    f = model.fields()
    print(f"wrote {args.output}: image {f['image_size']} patch {f['patch_size']} vision {f['vision_width']}x"
          f"{f['vision_layers']} text {f['text_width']}x{f['text_layers']} embed {f['embed_dim']} "
          f"{f['activation']} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
