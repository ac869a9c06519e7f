"""Release tooling: consolidating a DeepSpeed run into the released files, and loading them."""
