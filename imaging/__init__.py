"""Image files in and out, with no model in sight: above core/, below model/ (whose engine takes
a `Decoded` and returns an `Encoded`).

- `images`    decode (every format upscaled reads, EXIF, 16-bit, alpha), encode, output names
- `png`       the fast PNG writer (one filter, ISA-L deflate, streamed)
- `resize`    resizing a model's output
- `outscale`  output.scale / output.long_side, and the provenance each output records
- `quality`   the metrics protocol (PSNR/SSIM on Y, bicubic baselines, validation fingerprints)
"""
