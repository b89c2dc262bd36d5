"""Generation backends behind one interface (base.Engine): llama.cpp and vLLM."""
