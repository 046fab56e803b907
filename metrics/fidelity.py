"""Subject and prompt fidelity of generated images (DINO, CLIP-I, CLIP-T)."""
