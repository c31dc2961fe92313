"""Two-server additive secret-shared mode (issue #15).

Every linear layer of the decoder stack (and, by default, the LM head) is computed on
additive shares modulo 2^64: for an input x the device draws a fresh uniformly random r,
sends x - r to server 0; server 1 got a 32-byte ChaCha20 key once per session and expands r
itself; each server returns W times its share; the device adds the two answers. Either
server alone sees numbers that are uniform whatever x is. Everything non-linear
(embedding lookup, norms, rotary, attention over the device-held KV cache, activations,
residuals, sampling) runs on the device.

    ring.py     Z mod 2^64 fixed point: encode / decode, ChaCha20 masks, exact matmul mod 2^64
                (float64 limb GEMMs whose partial sums stay below 2^53)
    layers.py   the linear layers of a checkpoint in fixed point, their overflow bounds
                (checked at load: a layer that cannot be kept exact is refused by name), and the
                merged table (RMSNorm folded into the weights: 2 requests per decoder layer)
    service.py  `lambdasplit serve --component shares --share 0|1` (role "shares")
    device.py   the device runtime: the model with every linear layer a proxy over two sessions
    merged.py   the device's modules for the merged table (norms that record, answers that wait)
    decode.py   one new position over the merged table as numpy code (the steady state), with one
                PLAN frame per step to server 1 instead of a request header per layer group
    unet.py     `imagine --protocol shared`: the diffusers U-Net with its convolutions and linear
                projections as proxies (group norm, attention, scheduler, VAE on the device)
    run.py      `generate --mode shared --servers A,B` and its record
    audit.py    captures of each server's traffic, the statistical tests, the audit's attacks on them
    bench.py    `lambdasplit bench shared` (and `--audit`; a pipeline model measures images)

Measured results and what this mode does not protect: docs/privacy.md and docs/benchmarks.md,
"Secret-shared mode"; the wire format: docs/protocol.md.
"""
