"""The computation: the training loop (:mod:`.trainer`) and inference (:mod:`.inference`)."""
