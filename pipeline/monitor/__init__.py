"""What `gkd status` reads from Redis (`report`) and how it prints it (`text`)."""
