"""rlfb.envs"""
