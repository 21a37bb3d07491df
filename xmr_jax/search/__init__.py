"""Text-to-image search over a folder of images: build an index once, query it with free text.

    python -m xmr_jax.search index --checkpoint CKPT --images DIR --index GALLERY \
        [--chunk_size 4096] [--no_tokens]
    python -m xmr_jax.search query --index GALLERY --text "a woman in a red dress" \
        [--checkpoint CKPT] [--k 10] [--rerank_k 100] [--approx_recall 0.95] [--grid grid.png] \
        [--ground_truth gt.json]

CKPT is anything `xmr_jax.export.load_servable` reads (a training workdir with config.json, a
folder written by `python -m xmr_jax.convert`, a HF CLIPModel folder, an OpenAI CLIP file), or,
with `--exported DIR`, a `jax/` folder written by `python -m xmr_jax.export --formats jax`.

Region features (model family tgdt_regions, TGDT as published):

    python -m xmr_jax.search index --checkpoint WORKDIR --features TERAN_DIR [--split test] --index GALLERY

indexes a Flickr30K / COCO folder in TERAN's layout with the region builders' own reading and
checks (`xmr_jax.search.regions`); results name the image ids; queries are tokenized with the
family's BERT WordPiece vocab. A bad feature file is named before anything is written.

Image transform: `xmr_jax.image_transform` (= the evaluation transform of
data_pipelines/preprocess.py, without TensorFlow): RGB -> PIL bilinear resize to the model's (H, W),
antialiased when shrinking, as IRRA's torchvision transform -> (x / 255 - CLIP_MEAN) / CLIP_STD.

Index: a folder (format 2) of .npy chunks (global features, float16 token features + mask,
relative paths) with an index.json manifest (the model's fingerprint, ...), written chunk by chunk
on any etils.epath filesystem; rerunning an interrupted `index` command continues from the last
complete chunk. A query keeps only the global features in memory (memory-mapped on a local disk)
and reads only its candidates' tokens. Layout: `xmr_jax.search.store`. A format-1 .npz index
(earlier versions) still loads, whole, into memory.

Query: captions are tokenized with the model's text scheme (IRRA's mask-variant CLIP tokenizer, or
BERT WordPiece for tgdt_regions; context length from the model), encoded, and searched: two-stage
(global top `rerank_k`, exact or --approx_recall, then reranked by s_g + s_l with
`xmr_jax.retrieval.topk_search`) when the index holds tokens, else global cosine. Printed per
result: the rank, the score (s_g + s_l when reranked: it grows with the number of query words, so
compare it only within one query), the global cosine (comparable across queries) and the path. A
query longer than the context is cut: the CLI says how many tokens were kept. Empty queries are
rejected. --index, --grid, --ground_truth and --queries_file may be gs:// (or any etils.epath)
paths. Errors in user input exit with status 2 and a message naming the file or parameter; --index
(when indexing) and --grid are checked to be writable before any work. A grid labels each result
with its score and, for two-stage search, its global cosine; result images no longer under the
image folder are reported. TensorFlow is never imported.

Modules, one job each:
    encoders.py  `Encoders` from a CLIP module + params, an export Servable or a jax.export folder;
                 weight fingerprint
    index.py     image listing, `Gallery`, gallery encoding (`write_gallery`, `write_index`,
                 `build_index`), `load_index`, the .npz format, model check
    regions.py   region-feature galleries from a TERAN folder (`teran_records`, `region_gallery`)
    store.py     the index folder: `IndexWriter`, `IndexStore`, chunked global top-k
    query.py     query encoding and ranking (`search`, `SearchResult`)
    render.py    PNG result grids (`render_grid`, `GridLayout`)
    cli.py       the command line (`main`)
"""

from xmr_jax.search.cli import main, read_ground_truth
from xmr_jax.search.encoders import (Encoders, as_encoders, exported_encoders, load_encoders,
                                     model_encoders, params_fingerprint)
from xmr_jax.search.errors import IndexMismatchError, SearchError
from xmr_jax.search.index import (IMAGE_EXTENSIONS, INDEX_FORMAT, INDEX_VERSION, Gallery, ImageIndex,
                                  build_index, check_compatible, image_gallery, list_images, load_image,
                                  load_index, save_index, write_gallery, write_index)
from xmr_jax.search.regions import region_gallery, teran_records
from xmr_jax.search.store import STORE_VERSION, IndexStore, IndexWriter, chunked_topk
from xmr_jax.search.query import (SearchResult, check_queries, encode_texts, query_token_counts, search,
                                  search_features)
from xmr_jax.search.render import GREEN, GREY, WHITE, GridLayout, render_grid

__all__ = [
    "Encoders", "Gallery", "GREEN", "GREY", "GridLayout", "IMAGE_EXTENSIONS", "INDEX_FORMAT", "INDEX_VERSION",
    "ImageIndex", "IndexMismatchError", "IndexStore", "IndexWriter", "STORE_VERSION", "chunked_topk", "SearchError", "SearchResult", "WHITE", "as_encoders",
    "build_index", "check_compatible", "check_queries", "encode_texts", "exported_encoders",
    "list_images", "load_encoders", "load_image", "load_index", "main", "model_encoders",
    "params_fingerprint", "query_token_counts", "read_ground_truth", "render_grid", "save_index",
    "search", "search_features", "write_gallery", "write_index", "image_gallery", "region_gallery",
    "teran_records",
]
