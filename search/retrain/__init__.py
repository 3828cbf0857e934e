"""``tunecv retrain``: a search on each new data snapshot, warm-started from the
champion's run, gated champion against challenger on the new data, and registered in
MLflow's model registry. ``job`` runs the steps; ``warm`` picks what the new search
tries first; ``gate`` scores both ONNX exports and decides; ``registry`` owns every
MLflow call.
"""
