"""The search CLI: `python -m xmr_jax.search index|query ...` (usage: the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np

from xmr_jax.search.encoders import Encoders, load_encoders
from xmr_jax.search.errors import SearchError
from xmr_jax.search.index import check_compatible, image_gallery, list_images, load_index, write_gallery
from xmr_jax.search.query import query_token_counts, search
from xmr_jax.search.regions import SPLITS, is_region_index, region_gallery, teran_records
from xmr_jax.search.render import render_grid


def read_ground_truth(path: str, texts: Sequence[str]) -> list[list[str]]:
    """gt json: {query_text: [relative paths]} or a list (one entry per query, in order) of path
    lists (a bare string counts as one path) -> Q lists of relative paths."""
    from xmr_jax.logging_utils import as_path

    if not as_path(path).is_file():
        raise FileNotFoundError(f"--ground_truth {path!r} does not exist")
    try:
        data = json.loads(as_path(path).read_text())
    except json.JSONDecodeError as e:
        raise SearchError(f"--ground_truth {path!r} is not valid JSON: {e}") from e

    def as_list(value, where: str) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return list(value)
        raise SearchError(f"{path}: {where} must be a list of relative image paths, got {value!r}")

    if isinstance(data, dict):
        missing = [t for t in texts if t not in data]
        if missing:
            raise SearchError(f"{path}: no ground truth for query {missing[0]!r} (keys are query texts)")
        return [as_list(data[t], f"entry {t!r}") for t in texts]
    if isinstance(data, list):
        if len(data) != len(texts):
            raise SearchError(f"{path}: the list has {len(data)} entries but there are {len(texts)} queries")
        return [as_list(v, f"entry {i}") for i, v in enumerate(data)]
    raise SearchError(f"{path}: expected a JSON object {{query: [paths]}} or a list of path lists")


def _parse_args(argv):
    import xmr_jax.search as package  # its docstring is the usage text

    p = argparse.ArgumentParser(prog="python -m xmr_jax.search", description=package.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, required: bool):
        g = sp.add_mutually_exclusive_group(required=required)
        g.add_argument("--checkpoint", help="training workdir, `python -m xmr_jax.convert` folder, HF "
                                            "CLIPModel folder or OpenAI CLIP file")
        g.add_argument("--exported", help="a `python -m xmr_jax.export --formats jax` folder")
        sp.add_argument("--config", default=None, help="configs/x.py[:arg] describing a workdir's model")

    ix = sub.add_parser("index", help="encode a folder of images (or of region features) into an index")
    model_args(ix, True)
    source = ix.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder (searched recursively)")
    source.add_argument("--features", help="region features in TERAN's layout (Karpathy file, features_36/"
                                           "bu_att, bu_box; tgdt_regions models): see xmr_jax.search.regions")
    ix.add_argument("--split", action="append", choices=("train", "val", "test"), default=None,
                    help="--features: index only this Karpathy split (repeatable; default all)")
    ix.add_argument("--index", required=True,
                    help="output index folder (local or gs://); rerunning the same command resumes it")
    ix.add_argument("--batch_size", type=int, default=64)
    ix.add_argument("--chunk_size", type=int, default=4096,
                    help="images per chunk (the unit of writing and of resuming)")
    ix.add_argument("--no_progress", action="store_true", help="no progress bar")
    ix.add_argument("--no_tokens", action="store_true", help="store global features only")
    ix.add_argument("--skip_bad_images", action="store_true", help="skip (and count) undecodable images")
    ix.add_argument("--num_workers", type=int, default=None, help="image decoding threads")

    q = sub.add_parser("query", help="search an index with text")
    model_args(q, False)
    q.add_argument("--index", required=True, help="index folder (or a format-1 .npz)")
    q.add_argument("--text", action="append", default=[], help="a query (repeatable)")
    q.add_argument("--queries_file", help="text file, one query per line")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--rerank_k", type=int, default=100)
    mode = q.add_mutually_exclusive_group()
    mode.add_argument("--two_stage", dest="two_stage", action="store_true", default=None)
    mode.add_argument("--global_only", dest="two_stage", action="store_false")
    q.set_defaults(two_stage=None)
    q.add_argument("--grid", help="write a PNG grid of the results here")
    q.add_argument("--thumb", type=int, default=128, help="thumbnail box size in the grid (px)")
    q.add_argument("--ground_truth", help="json {query: [relative paths]} or a list per query")
    q.add_argument("--images", help="image folder (default: the one recorded in the index)")
    q.add_argument("--shard_gallery", action="store_true",
                   help="shard a .npz gallery over all local devices (two-stage search)")
    q.add_argument("--approx_recall", type=float, default=None,
                   help="global stage by jax.lax.approx_max_k with this recall target (e.g. 0.95; "
                        "approximate on TPU, exact on CPU/GPU) instead of the exact top-k")
    q.add_argument("--allow_other_weights", action="store_true",
                   help="query an index built from different weights of the same architecture")
    return p.parse_args(argv)


def _load_encoders(args) -> Encoders:
    return load_encoders(args.checkpoint, args.exported, args.config)


def _check_output_file(path: str, flag: str) -> None:
    """Before any work: `path` is not a folder and its folder can be created and written."""
    from xmr_jax.logging_utils import PathCheckError, as_path, check_writable_dir, describe_os_error

    if as_path(path).is_dir():
        raise SearchError(f"{flag} {path!r} is a folder; give the path of the file to write")
    parent = as_path(path).parent
    try:
        check_writable_dir(parent, flag)
    except PathCheckError as e:
        why = describe_os_error(e.__cause__) if e.__cause__ is not None else f"{parent} is a file"
        raise SearchError(f"{flag} {path!r}: its folder cannot be created or written: {why}") from e


def _write(write, path: str, flag: str):
    """Runs write(); an OSError (disk full, permissions) becomes a SearchError naming the flag."""
    from xmr_jax.logging_utils import describe_os_error

    try:
        return write()
    except OSError as e:
        raise SearchError(f"{flag} {path!r}: cannot write it: {describe_os_error(e)}") from e


def _check_index_folder(path: str) -> None:
    """Before any work: --index is not a file (nor a .npz name) and its parent can be written."""
    from xmr_jax.logging_utils import PathCheckError, as_path, check_writable_dir, describe_os_error

    if path.rstrip("/").endswith(".npz"):
        raise SearchError(f"--index {path!r}: the index is a folder of chunks now (format 2); give a "
                          "folder path without .npz (a format-1 .npz index still loads in `query`)")
    target = as_path(path)
    if target.exists() and not target.is_dir():
        raise SearchError(f"--index {path!r} is a file; the index is a folder: give a folder path")
    if target.is_dir() and not (target / "index.json").is_file() and any(True for _ in target.iterdir()):
        raise SearchError(f"--index {path!r} is a folder that holds other files and no index.json; "
                          "give a new or empty folder for the index")
    try:
        check_writable_dir(target.parent, "--index")
    except PathCheckError as e:
        why = describe_os_error(e.__cause__) if e.__cause__ is not None else f"{target.parent} is a file"
        raise SearchError(f"--index {path!r}: its folder cannot be created or written: {why}") from e


def _cmd_index(args, log) -> int:
    _check_index_folder(args.index)
    if args.chunk_size < 1:
        raise SearchError(f"--chunk_size must be >= 1, got {args.chunk_size}")
    if args.split and not args.features:
        raise SearchError("--split selects Karpathy splits of --features; an --images folder is indexed whole")
    if args.features:
        records = teran_records(args.features, args.split or SPLITS)
        enc = _load_encoders(args)
        gallery = region_gallery(enc, args.features, records, check_files=not args.skip_bad_images)
        source = args.features
    else:
        paths = list_images(args.images)
        enc = _load_encoders(args)
        gallery = image_gallery(enc, paths, args.images)
        source = args.images
    inputs = ", ".join(f"{i.name} {list(i.shape[1:])}" for i in enc.image_inputs)
    log(f"[index] {len(gallery.names)} images in {source}; model {enc.description['kind']} "
        f"embed_dim={enc.embed_dim} inputs {inputs}")
    try:
        index = _write(lambda: write_gallery(
            enc, gallery, args.index, chunk_size=args.chunk_size,
            batch_size=args.batch_size, with_tokens=not args.no_tokens,
            skip_bad_images=args.skip_bad_images, num_workers=args.num_workers,
            progress=not args.no_progress, log=log), args.index, "--index")
    except KeyboardInterrupt:
        log(f"[index] interrupted: the chunks written so far are kept; rerun the same command to "
            f"continue {args.index}")
        return 130
    skipped = index.meta["skipped"]
    if skipped:
        log(f"[index] skipped {len(skipped)} undecodable image(s): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""))
    shape = index.meta.get("token_shape")
    tok = f", tokens {(len(index), *shape)} float16" if index.has_tokens and shape else ", no tokens"
    print(f"[index] wrote {len(index)} images (global {(len(index), index.meta['embed_dim'])}{tok}) "
          f"in {len(index.chunk_rows)} chunk(s) -> {args.index}")
    return 0


def _read_queries(args) -> list[str]:
    from xmr_jax.logging_utils import as_path

    empty = [i + 1 for i, t in enumerate(args.text) if not t.strip()]
    if empty:
        raise SearchError(f"--text #{empty[0]} is empty: a query needs some words")
    texts = [t.strip() for t in args.text]
    if args.queries_file:
        if not as_path(args.queries_file).is_file():
            raise FileNotFoundError(f"--queries_file {args.queries_file!r} does not exist")
        texts += [line.strip() for line in as_path(args.queries_file).read_text().splitlines() if line.strip()]
    if not texts:
        raise SearchError("no queries: give --text (repeatable) or --queries_file")
    return texts


def _cmd_query(args, log) -> int:
    index = load_index(args.index)
    texts = _read_queries(args)
    if args.grid and is_region_index(index):
        raise SearchError(f"--grid: {args.index!r} indexes region features (results are image ids), there are "
                          "no image files to draw; drop --grid")
    if args.grid:
        _check_output_file(args.grid, "--grid")
        if args.images and not os.path.isdir(args.images):
            raise SearchError(f"--images {args.images!r} is not a folder (the grid's thumbnails are "
                              "read from it; default: the folder recorded in the index)")
    truth = read_ground_truth(args.ground_truth, texts) if args.ground_truth else None
    if not args.checkpoint and not args.exported:
        args.checkpoint = index.meta.get("model", {}).get("source")
        if not args.checkpoint:
            raise SearchError("--checkpoint (or --exported) is required: the index records no model source")
        if index.meta["model"].get("kind") == "jax.export":
            args.exported, args.checkpoint = args.checkpoint, None
    enc = _load_encoders(args)
    check_compatible(index, enc, args.allow_other_weights)
    built = str(index.meta.get("model", {}).get("fingerprint", ""))
    if built.split(":")[0] != str(enc.description.get("fingerprint", "")).split(":")[0]:
        log(f"[query] note: the index was built from {index.meta['model'].get('source')!r} "
            f"({index.meta['model'].get('kind')}), the query model is {enc.description.get('source')!r} "
            f"({enc.description.get('kind')}): their weights cannot be compared, only their shapes")
    image_root = args.images or index.image_root
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",)) if args.shard_gallery else None
    counts = query_token_counts(texts, enc.context_length, enc.tokenizer())
    wordless = [q + 1 for q, (total, _) in enumerate(counts) if total == 0]
    if wordless:
        raise SearchError(f"query {wordless[0]} ({texts[wordless[0] - 1]!r}) has no words the tokenizer keeps")
    res = search(index, enc, None, texts, k=args.k, rerank_k=args.rerank_k, two_stage=args.two_stage,
                 check=False, mesh=mesh, recall_target=args.approx_recall)
    mode = f"two-stage (rerank top {min(res.rerank_k, len(index))} by s_g + s_l)" if res.two_stage else "global cosine"
    for q, (total, kept) in enumerate(counts):
        if kept < total:
            log(f"[query] query {q + 1}: {total} tokens, only the first {kept} were used (context length "
                f"{enc.context_length} incl. start/end); the rest of the query was ignored")
    if res.two_stage:
        print("columns: rank, score (s_g + s_l: grows with the query's length, compare within a query), "
              "global cosine (comparable across queries), path")
    for q, text in enumerate(texts):
        total, kept = counts[q]
        cut = f", cut to {kept} of {total} tokens" if kept < total else ""
        print(f'query {q + 1}: "{text}"  [{mode}, {len(index)} images{cut}]')
        for r, (path, score) in enumerate(zip(res.paths[q], res.scores[q])):
            hit = "  *" if truth is not None and os.path.normpath(path) in {os.path.normpath(p) for p in truth[q]} else ""
            cosine = f"  {res.cosine[q][r]:7.4f}" if res.two_stage else ""
            print(f"  {r + 1:3d}  {score:8.4f}{cosine}  {path}{hit}")
    if args.grid:
        shown = sorted({p for row in res.paths for p in row})
        missing = [p for p in shown if not os.path.isfile(os.path.join(image_root, p))]
        if missing:
            log(f"[query] {len(missing)} of the {len(shown)} result images are not under {image_root!r} "
                f"(moved since indexing? pass --images): their grid boxes say 'missing'")
        _write(lambda: render_grid(texts, res.paths, res.scores, image_root, args.grid, truth,
                                   (args.thumb, args.thumb), cosine=res.cosine if res.two_stage else None),
               args.grid, "--grid")
        print(f"[query] grid -> {args.grid}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry; returns the exit status (2 on bad input, with the message on stderr)."""
    args = _parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        return _cmd_index(args, log) if args.command == "index" else _cmd_query(args, log)
    except (SearchError, OSError, ValueError, KeyError) as err:  # OSError: FileNotFoundError, ...
        print(f"error: {err}", file=sys.stderr)
        return 2
