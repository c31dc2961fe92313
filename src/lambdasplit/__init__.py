"""lambdasplit: privacy-preserving Λ-split inference of generative models.

The data flow, visible in the layout:

    llm/ and diffusion/   how a model is cut into head, body and tail
    wire/                 codecs, frames and the byte-counting transport
    server/               the body server (cloud side)
    client/               the device runtime (head + tail) and the generation loop
    zoo/                  bundled default models
    bench/, audit/        measurements: speed and traffic, privacy
"""

__version__ = "0.1.0"
