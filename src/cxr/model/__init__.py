"""The model: the network and its starting weights, the loss, the bundle, the ONNX export."""
