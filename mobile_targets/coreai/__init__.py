"""Core AI target (iOS 27+ / macOS 27+): `.aimodel` assets run by Apple's Core AI runtime."""
