"""The trainer's parts, one module each; the three commands at the repository root use them."""
