"""sfattn: sequence-parallel attention for Diffusion Transformer inference, over oneside."""
