"""IVT for text-based person retrieval in JAX/Flax. The rooms, lowest first (a room imports only rooms below it):

  runtime/     devices and meshes, parameter and batch shardings, what a program prints, command-line errors
  models/      the IVT encoder, the part head, CLIP's two towers, the head chosen by config and its embedders
  objectives/  CMPM, the part losses, CLIP's SDM / ID / ITC
  weights/     weight files, key mapping, load reports: pretrained, released and CLIP weights
  evaluation/  embedding a split, ranking, metrics, top-k over a sharded gallery, the retrieval picture
  training/    optimizer, train step and its setup, prefetch, checkpoints and their checksums, the run lock, the loop
  search/      image indexes, the search model, the query command, the server, its page and attention maps
  bench/       benchmarks of the step, the loop and the part head
  planner/     compiling for Cloud TPU slices and GPU hosts on this CPU: memory, FLOPs, collectives, roofline
  tools/       programs: conversion, ablation, parity checks, chaos, load and GPU benchmarks

The modules directly here are the programs (`python -m ivt_jax.main`, .evaluate, .search, .serve, .benchmark,
.attention_maps, .aot); docs/architecture.md shows how data flows through the rooms.
"""
