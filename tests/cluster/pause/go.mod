module runnablek8s.test/pause

go 1.21
