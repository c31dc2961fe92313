"""PPIDM: the U-Net's heavy layers partitioned across n non-colluding shard servers.

After Wang et al., "PPIDM: Privacy-Preserving Inference for Diffusion Model in the Cloud"
(shared/papers/ppidm.md). The device runs the U-Net itself, module by module, and offloads
three kinds of layer, each server seeing only its part of the layer's input:

    convolution   the input map is cut into a grid of spatial blocks; each server gets its
                  block plus the halo the kernel needs and convolves it (halo-exact)
    group norm    each server gets its block and returns per-group (mean, variance);
                  exact mode: the device combines them into the global statistics;
                  paper mode: each block is normalized with its own (the paper's PPIGN)
    attention     the device computes Q, K, V; each server gets a contiguous chunk of Q
                  rows and the FULL K and V, and attends

Everything else (time embedding, linear projections, layer norms, activations, residual
additions, up-sampling glue, the normalization arithmetic itself) stays on the device.

    blocks.py   the partition: grids, halos, what is too small to cut
    ops.py      the wire format of one request and the shard-side arithmetic
    driver.py   the device side: the U-Net with proxy layers, the fan-out to n servers,
                several layers per round trip where the data flow allows (batching),
                traffic / time / FLOPs per layer type
    service.py  `lambdasplit serve --component unet-shard` (role "unet-shard")
    run.py      `imagine --protocol ppidm`: one image and its record
    bench.py    `lambdasplit bench ppidm`: quality, traffic per layer type, offloaded FLOPs
    audit.py    `lambdasplit audit diffusion --protocol ppidm`: leakage per server
"""
