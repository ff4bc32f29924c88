"""How rows reach the model: the training table, feature inputs and encoding, resident and streamed batches."""
