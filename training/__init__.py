"""Research side of osteo-node: phantoms, training, evaluation, explainability, export.

Training imports the node's model code (osteo_node.model, osteo_node.pixels, osteo_node.bundle);
the node never imports training.
"""
