"""Stage 3: contrastive RelP attribution over MLP neurons, pruning, edges, labels, faithfulness, export."""
