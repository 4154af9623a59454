package kube

import (
	"bytes"
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// RootKey is the key of the root certificate in the ConfigMap PublishRoot writes, the
// name istiod uses in its istio-ca-root-cert ConfigMaps.
const RootKey = "root-cert.pem"

// PublishRoot makes ConfigMap namespace/name hold rootPEM under RootKey, so that the
// proxies, which mount it, trust the mesh's root and can verify the CA: the service
// publishes the trust bundle of the key it holds. Other keys of the ConfigMap are kept;
// an unchanged one is not written. It reports whether it wrote.
func PublishRoot(ctx context.Context, client kubernetes.Interface, namespace, name string, rootPEM []byte) (bool, error) {
	cms := client.CoreV1().ConfigMaps(namespace)
	for range 5 { // a concurrent writer (a second replica) makes an update conflict: read again
		cur, err := cms.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			cm := &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace,
					Labels: map[string]string{"app.kubernetes.io/name": "nftmesh", "app.kubernetes.io/component": "ca"}},
				Data: map[string]string{RootKey: string(rootPEM)},
			}
			_, err = cms.Create(ctx, cm, metav1.CreateOptions{FieldManager: "nftmesh-ca"})
			if apierrors.IsAlreadyExists(err) {
				continue
			}
			if err != nil {
				return false, fmt.Errorf("configmap %s/%s: create: %w", namespace, name, err)
			}
			return true, nil
		}
		if err != nil {
			return false, fmt.Errorf("configmap %s/%s: get: %w", namespace, name, err)
		}
		if bytes.Equal([]byte(cur.Data[RootKey]), rootPEM) {
			return false, nil
		}
		cur = cur.DeepCopy()
		if cur.Data == nil {
			cur.Data = map[string]string{}
		}
		cur.Data[RootKey] = string(rootPEM)
		_, err = cms.Update(ctx, cur, metav1.UpdateOptions{FieldManager: "nftmesh-ca"})
		if apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return false, fmt.Errorf("configmap %s/%s: update: %w", namespace, name, err)
		}
		return true, nil
	}
	return false, fmt.Errorf("configmap %s/%s: kept changing under five updates", namespace, name)
}
