"""rlfb.agents"""
