"""The paper's methods as pure JAX functions (no config, no I/O): FaceMix and the other
mixings (`facemix`), the pseudo-label threshold policies with the Dynamic Threshold Module
(`thresholds`), LEAF's expression-aware aggregation (`leaf`) and negative learning on
LEAF's negative sets (`negative_learning`). The trainers wire them into losses."""
