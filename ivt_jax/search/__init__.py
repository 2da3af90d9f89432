"""Search images by text: `from ivt_jax import search` gives the API, `python -m ivt_jax.search` the command.

Rooms inside: model (load a model, embed), index (build, update an index), store (its files), command (rank,
contact sheet, the command), state / ann / server / web (the search page), attention_maps (what the model looks
at), frames / detect (video frames, people in frames, crops).
"""
from ivt_jax.search.command import cli, contact_sheet, main, parse_args, search  # noqa: F401
from ivt_jax.search.index import (  # noqa: F401
    Index, build_index, check_identity, list_images, load_image, load_index)
from ivt_jax.search.model import (  # noqa: F401
    IdentityMismatchError, LoadedModel, embed_images, embed_texts, load_config_file, load_model, model_identity)
