"""DICOM ingest: folders / files / datasets -> one CT :class:`~sdk.volume.Volume` in HU.

- :func:`list_series` - every image series in a source, the default choice marked, with reasons.
- :func:`load_series` - load one series (the default choice or ``series_uid``) in canonical LPS
  orientation, HU per slice, gantry tilt corrected, missing slices detected.
- :mod:`sdk.io.decoders` - pluggable pixel decoders (pylibjpeg, then python-gdcm).

See docs/ingest.md for the selection rule, the geometry rules and the per-folder outcomes on the
shared test data.
"""
from __future__ import annotations

from .decoders import (
    DecoderPlugin, available_decoders, decode_pixels, decoder_chain, register_decoder, syntax_name,
    unregister_decoder,
)
from .reader import SeriesInfo, inspect_and_load, list_series, load_series, regroup_single_files, series_files

__all__ = [
    "SeriesInfo", "inspect_and_load", "list_series", "load_series", "regroup_single_files", "series_files",
    "DecoderPlugin", "available_decoders", "decode_pixels", "decoder_chain", "register_decoder", "syntax_name",
    "unregister_decoder",
]
