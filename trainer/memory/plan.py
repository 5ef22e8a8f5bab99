"""placeholder"""
class MemoryPlan: pass
def estimate_memory(*a, **k): pass
def plan_memory(*a, **k): pass
