"""The evaluation job: hold out known sections, predict them with each model, score them."""
