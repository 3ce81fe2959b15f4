// Command kube-apiserver is upstream's k8s.io/kubernetes/cmd/kube-apiserver main (Apache-2.0),
// built here from the k8s.io/kubernetes module that ../../go.mod pins (see ../../README.md).
package main

import (
	"os"
	_ "time/tzdata" // for timeZone support in CronJob

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
