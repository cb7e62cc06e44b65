"""The HTTP API: OpenAI-compatible Videos API routes over `serving.jobs.videos.VideoJobs`."""
