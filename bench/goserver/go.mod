module agentsmithy/bench/goserver

go 1.19
