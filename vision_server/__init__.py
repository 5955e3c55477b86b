"""The vision server: preprocessing, the vision half (ViT + MLP + ViR), the cross-request batcher, gRPC.

Modules: `preprocess` (the model card's tiling), `video` (load_video with PyAV), `model` (VisionHalf),
`vir` (ViR modules and decision rule), `batcher`, `cache` (encoder cache), `engine` (one Encode
request end to end), `service` (gRPC + lifecycle), `config`, `cli` (`dvd vision`).

What a feature frame says (transport's FeatureHeader): one frame per slot (an image, or one video
frame), the tensor flat `[N, D]` in BF16 with N = the slot's number of `<IMG_CONTEXT>` tokens, tiles in
order. `header.shape[0]` is therefore always N, which is all the language server needs to expand the
slot. `tokens_per_tile` is 256 when every tile kept 256 tokens, 64 when ViR compressed them all, and 0
when ViR mixed both in one image (the header has one such field, and the wire format is strict about its
keys, so no per-tile list was added). The per-tile counts are in the Encode response
(`SlotResult.tokens_per_tile`) for whoever wants them.
"""
