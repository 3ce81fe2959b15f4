// Command etcd is etcd's own main (go.etcd.io/etcd/v3, Apache-2.0) on the etcd server module at
// the version k8s.io/kubernetes requires (../../go.mod), so it joins the one build of the cluster.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
