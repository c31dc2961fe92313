"""What crosses the network: codecs, frames, and a transport that counts every byte.

    codecs.py     tensor <-> bytes (fp32/fp16/bf16, affine intN bit-packed)
    frames.py     the session protocol's frames (see docs/protocol.md)
    transport.py  blocking client socket (optional TLS) that counts bytes; link emulation
"""
